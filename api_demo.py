"""Serve a trained model over HTTP: the original's /api/chat, an OpenAI-compatible API, a chat page.

    python api_demo.py                                   # http://127.0.0.1:8812, model_save/final (else model_save/)
    python api_demo.py --model_dir model_save/sft/best --host 0.0.0.0 --port 8812 --api_key SECRET

    curl -s -X POST http://127.0.0.1:8812/api/chat -H "Content-Type: application/json" -d '{"input_txt": "感冒了要怎么办"}'

Open http://127.0.0.1:8812/ for the chat page; OpenAI clients use base_url
http://127.0.0.1:8812/v1. With --api_key set, send `Authorization: Bearer SECRET`.
Endpoints, limits and error codes: utils/api_app.py. Every InferConfig field can be set as
`--field value` (see --help).
"""
from config import InferConfig
from utils.cli import parse_config, run_cli


def main() -> None:
    _, config = parse_config(InferConfig, description=__doc__)
    from model.infer import find_model
    from utils.api_app import serve

    config.model_dir = str(find_model(config))  # serve prints it: the model being served
    serve(config)


if __name__ == "__main__":
    run_cli(main)
