"""Evaluation of generated videos (`longlive.eval.synth`: detector and judge for the procedural synth world)."""
