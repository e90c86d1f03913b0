"""The app's OpenAI-compatible API (/v1): slides as files, questions as chat completions, per-key isolation.

| module | one idea |
|---|---|
| `app.py` | the routes, the key check, the order of checks |
| `keys.py` | the key file, owners, per-key budgets |
| `files.py` | uploaded slides as engine sessions, their status |
| `upload.py` | the multipart upload streamed to disk within its limits |
| `requests.py` | an OpenAI chat request → slide, conversation, question, settings |
| `completions.py` | one answer in a thread, streamed; stop sequences; the response shapes |
| `models.py` | the served model and its card |
| `errors.py` | OpenAI's error shape |
| `serve.py` | the API alone under uvicorn (`chatexaonepath serve`) |

docs/api.md is the user's guide.
"""

from .app import build_api
from .keys import ApiKeys
from .serve import ApiServer

__all__ = ["ApiKeys", "ApiServer", "build_api"]
