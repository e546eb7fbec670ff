"""The built-in shapes world: scenes, captions, verifier, tiny SD pipeline and CLIP."""
