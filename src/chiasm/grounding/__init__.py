"""Grounding: boxes as text in and out of the LM (chiasm.grounding.boxes), IoU scoring, boxes drawn."""
