"""Viewing tools: numbers that describe what a KAN layer learned (:mod:`.analysis`), their
pictures (:mod:`.plots`) and the report of a trained run (:mod:`.report`)."""
