"""The synthetic world's former import path, kept as a re-export for code written against it.

The world lives in :mod:`chiasm.synthetic.world`; nothing in chiasm imports this module.
"""

from chiasm.synthetic.world import (
    BACKGROUNDS,
    CELLS,
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    Question,
    Scene,
    SceneObject,
    WorldFiles,
    caption,
    make_question,
    make_world,
    object_geometry,
    render_scene,
    sample_scene,
    scene_from_meta,
    scene_regions,
)

__all__ = ["BACKGROUNDS", "CELLS", "COLOURS", "QUESTION_TYPES", "SHAPES", "SIZES", "Question", "Scene", "SceneObject",
           "WorldFiles", "caption", "make_question", "make_world", "object_geometry", "render_scene", "sample_scene",
           "scene_from_meta", "scene_regions"]
