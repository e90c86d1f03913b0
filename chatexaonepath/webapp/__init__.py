"""The chat app: upload a whole-slide image, watch it being read, see what the model attends to, and chat.

engine.py holds what every browser session shares (the model, the patch encoder, the feature
cache, the example slide); session.py one browser session's slide and conversation; uploads.py
checks and unpacks uploaded files; ui.py lays out the Gradio page; cli.py launches it.
"""

import os

# Gradio reports usage to its servers unless told not to; a pathology app must not phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
