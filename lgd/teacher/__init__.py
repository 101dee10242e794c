"""LGD's implicit teacher: builds FPN-shaped knowledge from labels and the student's features.

One module per part of the paper: :mod:`descriptors` (label descriptors), :mod:`label_encoder`,
:mod:`appearance` (appearance encoder), :mod:`relation` (inter-object relation adapter),
:mod:`mapper` (intra-object knowledge mapper), :mod:`masks` (inside masks, pooling, painting),
and :mod:`teacher`, which wires them together.
"""

from lgd.teacher.appearance import AppearanceEncoder
from lgd.teacher.descriptors import PaddedObjects, descriptor_dim, label_descriptors, pad_objects
from lgd.teacher.label_encoder import LabelEncoder, SpatialTransformer
from lgd.teacher.mapper import IntraObjectKnowledgeMapper
from lgd.teacher.masks import inside_masks, mask_crops, mask_pool, paint, resize_masks
from lgd.teacher.relation import InterObjectRelationAdapter
from lgd.teacher.teacher import ImplicitTeacher, TeacherOutput

__all__ = [
    "AppearanceEncoder",
    "ImplicitTeacher",
    "InterObjectRelationAdapter",
    "IntraObjectKnowledgeMapper",
    "LabelEncoder",
    "PaddedObjects",
    "SpatialTransformer",
    "TeacherOutput",
    "descriptor_dim",
    "inside_masks",
    "label_descriptors",
    "mask_crops",
    "mask_pool",
    "pad_objects",
    "paint",
    "resize_masks",
]
