"""Serve a trained model over HTTP: the original's /api/chat, an OpenAI-compatible API, a chat page.

    python api_demo.py                                   # http://127.0.0.1:8812, model_save/final (else model_save/)
    CHATLM_API_KEY=SECRET python api_demo.py --model_dir model_save/sft/best --host 0.0.0.0 --port 8812
    CHATLM_MODEL_DIR=model_save/sft/best uvicorn api_demo:app --port 8812   # as the original documents

    curl -s -X POST http://127.0.0.1:8812/api/chat -H "Content-Type: application/json" -d '{"input_txt": "感冒了要怎么办"}'

Open http://127.0.0.1:8812/ for the chat page; OpenAI clients use base_url
http://127.0.0.1:8812/v1. With a key set (CHATLM_API_KEY, --api_key_file FILE, or --api_key
KEY, which `ps` shows), send `Authorization: Bearer KEY`. Endpoints, limits and error codes:
utils/api_app.py. Every InferConfig field can be set as `--field value` (see --help), or for
`uvicorn api_demo:app` as the environment variable CHATLM_<FIELD>.
"""
import sys

from config import InferConfig
from utils.cli import UserError, parse_config, run_cli


def main() -> None:
    _, config = parse_config(InferConfig, description=__doc__)
    from utils.api_app import serve

    serve(config)


def __getattr__(name: str):
    """`app`, built on first access (so importing this module loads no model): what `uvicorn
    api_demo:app` serves, with the settings of utils.api_app.config_from_env."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from utils.api_app import app_from_env

    try:
        app = app_from_env()
    except UserError as exc:  # uvicorn would print a traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    globals()["app"] = app
    return app


if __name__ == "__main__":
    run_cli(main)
