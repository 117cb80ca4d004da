"""Generate for a list of prompts with one loaded model, through the batched decoder.

    python examples/batch_generate.py MODEL_DIR

Prints one JSON line per prompt ({"id", "text", "token_ids", "prompt_tokens", "finish_reason"}), in order.
"""

import json
import sys

from llamacli.batch import generate_many
from llamacli.generation import Engine


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/batch_generate.py MODEL_DIR")
    engine = Engine.load(sys.argv[1], dtype="float32", device="cpu")  # load once ...
    prompts = [
        "Write one sentence about the sea.",
        {"id": "haiku", "prompt": "Write a haiku about autumn.", "temperature": 0.8, "seed": 1},
        {"id": "chat", "messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": "What is the capital of Italy?"}]},
        "Name three colours.",
    ]
    # ... and generate for all prompts together; per-prompt fields override these defaults.
    for result in generate_many(engine, prompts, max_new_tokens=32, batch_size=4):
        print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
