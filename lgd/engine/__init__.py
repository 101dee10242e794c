"""The training engine: ``training.train(cfg)`` builds a run, a ``Trainer`` (trainer.py) runs it through its hooks
(hooks.py), one step at a time (step.py) with the optimisers and schedule of solver.py; checkpoints, the output
folder, the records of a run, stop signals and loss warnings each have their module."""
