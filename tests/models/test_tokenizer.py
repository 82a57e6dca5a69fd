"""pipeline/models/world.py's tokenizer: trained the same way every time (DVC reproduces the backbone)."""

import json

from pipeline.data.prompts import global_prompt, local_prompt
from pipeline.models.world import train_tokenizer
from tests.params import config

CORPUS = sorted({global_prompt([{"color": c, "shape": s}, {"color": "blue", "shape": "ring"}], b)
                 for c in ("red", "green", "yellow") for s in ("circle", "square", "cross") for b in ("plain", "striped")}
                | {local_prompt([{"color": c, "shape": "triangle"}], "dotted", [0]) for c in ("red", "white")})


def test_training_the_tokenizer_twice_gives_the_same_vocabulary_and_ids():
    cfg = config({"text": {"vocab_size": 400}})
    a, b = (train_tokenizer(CORPUS, cfg) for _ in range(2))
    assert json.dumps(a.get_vocab(), sort_keys=True) == json.dumps(b.get_vocab(), sort_keys=True)
    assert [a(p)["input_ids"] for p in CORPUS] == [b(p)["input_ids"] for p in CORPUS]
    # the word-final tokens pinned for the trainer stay ordinary vocabulary, not added special tokens
    assert {str(t) for t in a.added_tokens_decoder.values()} == {"<|startoftext|>", "<|endoftext|>"}
