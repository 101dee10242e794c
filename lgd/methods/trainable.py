"""What training, evaluation and checkpoints need of a model: ``Trainable``, which LGD and the plain Baseline are.

The loop asks the model, never its type: which optimizers to build (``optimizer_groups``), what the schedule's
windows do at an iteration (``set_iteration``), whether DDP must look for unused parameters, and for the teacher
diagnostic (``teacher_detect``). ``student`` is always the torchvision detector that is deployed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from lgd.detectors import Targets
from lgd.errors import LGDError


@dataclass
class OptimizerGroup:
    """The modules one optimizer updates; a hyper-parameter left None is the solver config's."""

    modules: list[nn.Module]
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    optimizer: Optional[str] = None  # "sgd" | "adamw"


class Trainable(nn.Module):
    """A detector as training sees it.

    ``forward(images, targets)`` in training mode returns the loss terms (name -> scalar tensor), in eval mode the
    student's detections (one dict per image: "boxes" (N, 4) XYXY in image pixels, "scores" (N,), "labels" (N,)).
    """

    student: nn.Module
    has_teacher: bool = False  # whether teacher_detect works (the teacher diagnostic)

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """The SGD optimizers this model trains with, one group each, in a fixed order."""
        raise NotImplementedError

    def set_iteration(self, iteration: int) -> None:
        """Apply the schedule's windows for this iteration (call before each training step); none by default."""

    def may_leave_parameters_unused(self, start: int, images_may_lack_objects: bool) -> bool:
        """Whether some training step from iteration ``start`` on may give a trainable parameter no gradient (DDP
        must then look for such parameters every step); ``images_may_lack_objects``: training keeps images
        without annotations (``data.filter_empty=false``)."""
        return False

    def describe(self) -> str:
        """One line on how this model trains, for the summary printed before training."""
        return "off: the plain baseline (distill.method=none, or lgd.enabled=false)"

    def teacher_detect(self, images: list[Tensor], targets: Targets) -> list[dict[str, Tensor]]:
        """The teacher diagnostic's detections. Raises LGDError: only LGD has a teacher."""
        raise LGDError("the teacher diagnostic needs an LGD model (lgd.enabled=true)")


class Baseline(Trainable):
    """The plain detector, trained by the same loop and recipe as LGD (``lgd.enabled=false``): one optimizer.

    Its state dict is the detector's own (no ``student.`` prefix): a baseline checkpoint's weights load into a
    torchvision detector as they are.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.student = detector

    def forward(self, images: list[Tensor], targets: Optional[Targets] = None):
        return self.student(images, targets)

    def optimizer_groups(self) -> list[OptimizerGroup]:
        return [OptimizerGroup([self.student])]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)
