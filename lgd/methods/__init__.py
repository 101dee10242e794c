"""What a detector learns from besides its own loss (``distill.method``), each behind the ``Trainable`` interface
the engine drives: ``LGD`` (label-guided self-distillation, lgd.py), ``FGFI`` (imitation of a frozen teacher,
fgfi.py) and ``Baseline`` (the plain detector, trainable.py); ``build_model`` picks one from the config."""
