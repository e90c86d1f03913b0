"""The LLaVA-style ChatEXAONEPath model and chat sessions (built in the model issue)."""
