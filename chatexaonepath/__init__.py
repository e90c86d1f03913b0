"""ChatEXAONEPath: chat with a multimodal LLM about whole-slide pathology images."""

__version__ = "0.1.0"
