"""Remote code (issue 24, item 6): RWKV-7-world's tokenizer is Python code shipped with the checkpoint
(tokenizer_config.json ``auto_map``). It loads only with the explicit ``trust_remote_code`` opt-in; without
it, one line naming the parameter, before any weights load. Nothing else runs a checkpoint's code, opt-in
or not. Checked with a local checkpoint directory whose tokenizer is such code."""
import json

import pytest

from writesae import pipeline
from writesae.hosts import load_host

TOKENIZER_CODE = '''
from transformers import PreTrainedTokenizer


class ToyTokenizer(PreTrainedTokenizer):
    """One id per character (mod the vocabulary)."""

    def __init__(self, **kw):
        super().__init__(**kw)

    @property
    def vocab_size(self):
        return 101

    def get_vocab(self):
        return {chr(32 + i): i for i in range(101)}

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return (ord(token) - 32) % 101

    def _convert_id_to_token(self, i):
        return chr(32 + i)
'''

MODEL_CODE = '''
import pathlib
pathlib.Path(__file__).with_name("MODEL_CODE_RAN").touch()
raise RuntimeError("a checkpoint's model code ran")
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny RWKV-7 checkpoint whose tokenizer is code (auto_map), and whose config.json also names model code."""
    d = tmp_path_factory.mktemp("rwkv7_custom")
    load_host("tiny:rwkv7", device="cpu").model.save_pretrained(d)
    (d / "tokenization_toy.py").write_text(TOKENIZER_CODE)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ToyTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_toy.ToyTokenizer", None]}}))
    (d / "modeling_evil.py").write_text(MODEL_CODE)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_without_the_opt_in_one_line_names_the_parameter_before_any_weights(checkpoint, monkeypatch):
    import transformers

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded before the tokenizer was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError) as e:
        load_host(str(checkpoint), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "trust_remote_code" in msg and "tokenization_toy.ToyTokenizer" in msg, msg


def test_with_the_opt_in_the_tokenizer_loads_and_no_model_code_runs(checkpoint):
    h = pipeline.host(str(checkpoint), "cpu", "float32", True)
    assert type(h.tokenizer).__name__ == "ToyTokenizer"
    assert h.tokenizer("ab", add_special_tokens=False)["input_ids"] == [65, 66]
    assert type(h.model).__module__.startswith("writesae.models")  # this package's class, not modeling_evil
    assert not (checkpoint / "MODEL_CODE_RAN").exists()
    assert not any(p.name == "MODEL_CODE_RAN" for p in checkpoint.parent.rglob("*"))
