"""ChatEXAONEPath chat app, Spaces-style entry point: `python app.py [options]`.

Same program as `chatexaonepath app` (see `python app.py --help` and docs/app.md). With no options
it serves the demo model (docs/demo_model.md): the embedded SmolLM2 LLM and EXAONEPath if its
weights are found (else a random ViT-B/16), with a tower and LoRA trained on synthetic lesion
slides on the first run and cached, all clearly labelled, on http://127.0.0.1:7860 with one of its
held-out slides as the example. To embed the page elsewhere, build it with `build_demo(engine)`.
"""

from chatexaonepath.webapp.cli import main
from chatexaonepath.webapp.engine import AppConfig, AppEngine
from chatexaonepath.webapp.ui import build_demo

__all__ = ["AppConfig", "AppEngine", "build_demo", "main"]

if __name__ == "__main__":
    main()
