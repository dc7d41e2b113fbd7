from zeroseg.clip.prompts import TEMPLATE_SETS, fill_templates, resolve_templates
from zeroseg.clip.teacher import CLIPTeacher, dense_zero_shot_logits, interpolate_position_embedding

__all__ = [
    "CLIPTeacher",
    "TEMPLATE_SETS",
    "dense_zero_shot_logits",
    "fill_templates",
    "interpolate_position_embedding",
    "read_state_dict",
    "resolve_templates",
]
