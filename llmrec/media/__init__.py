"""Decoding of untrusted media files (audio clips, cover images) into what the frozen encoders take.

One definition for every stage: `llmrec features` decodes the catalog's files with it and the server decodes
uploads with it, so a song's features are the same whichever way it arrived.
"""
from llmrec.media.audio import MediaError, load_audio, resample
from llmrec.media.image import load_image, prepare_image

__all__ = ["MediaError", "load_audio", "load_image", "prepare_image", "resample"]
