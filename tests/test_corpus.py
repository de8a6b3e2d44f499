"""The corpus layer (issue 24, item 4): every kind of corpus the tests write (jsonl, parquet, txt, a folder, a
datasets save_to_disk directory) gives the same windows in the same order, split into train and held-out by
the seed; asking for more windows than a corpus holds is an error naming both numbers; a hub name that is not
cached fails offline with one line naming the fix."""
import json
import os
import subprocess
import sys

import pytest
import torch

from writesae import corpus as C
from writesae import pipeline
from writesae.extract import embedded_text, token_windows

W = 16


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from writesae.hosts import EMBEDDED_DIR

    return AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))


@pytest.fixture(scope="module")
def records():
    """70 short passages of the shipped held-out text (its paragraphs)."""
    paras = [p.strip() for p in embedded_text("heldout").split("\n\n") if len(p.strip()) > 40]
    return paras[:70]


def _reference(tok, records, window, seed):
    """The spec written out: every record's tokens followed by end-of-text, cut into windows, split by seed."""
    ids = [i for r in records for i in tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    ws = [torch.tensor(ids[j * window:(j + 1) * window]) for j in range(len(ids) // window)]
    out = {"train": [], "heldout": []}
    for i, w in enumerate(ws):
        out["heldout" if C.heldout(seed, i) else "train"].append(w)
    return {k: torch.stack(v) for k, v in out.items()}


def _write(kind, records, path, field="text"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(records)))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(records))), field: records}), path, row_group_size=7)
    elif kind == "disk":
        import datasets

        datasets.Dataset.from_dict({field: records}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind,name", [("jsonl", "c.jsonl"), ("parquet", "c.parquet"), ("disk", "ds")])
def test_every_kind_gives_the_specified_windows(tok, records, tmp_path, kind, name):
    src = _write(kind, records, tmp_path / name)
    ref = _reference(tok, records, W, seed=0)
    assert len(ref["train"]) > 100 and 3 <= len(ref["heldout"]) < len(ref["train"]) / 4  # ~ HELDOUT_SHARE
    for split in C.SPLITS:
        got = C.windows(tok, src, split, W, len(ref[split]), seed=0)
        assert torch.equal(got, ref[split]), (kind, split)
    assert C.count(tok, src, W, 0) == {k: len(v) for k, v in ref.items()}
    assert torch.equal(C.windows(tok, src, "train", W, 5, seed=0), ref["train"][:5])  # a prefix: order is fixed


def test_the_split_is_fixed_by_the_seed(tok, records, tmp_path):
    src = _write("jsonl", records, tmp_path / "c.jsonl")
    a, b = _reference(tok, records, W, seed=0), _reference(tok, records, W, seed=1)
    assert not torch.equal(a["heldout"][:3], b["heldout"][:3])
    got = C.windows(tok, src, "heldout", W, 3, seed=1)
    assert torch.equal(got, b["heldout"][:3])
    # train and held-out passages never share a window
    tr = {tuple(w.tolist()) for w in C.windows(tok, src, "train", W, len(a["train"]), seed=0)}
    assert not tr & {tuple(w.tolist()) for w in a["heldout"]}


def test_more_windows_than_the_corpus_holds_is_an_error_naming_both(tok, records, tmp_path):
    src = _write("parquet", records, tmp_path / "c.parquet")
    n = len(_reference(tok, records, W, 0)["train"])
    with pytest.raises(ValueError, match=rf"holds {n:,} train windows of {W} tokens .*, 5,000 asked for"):
        C.windows(tok, src, "train", W, 5000)
    # the shipped text too: token_windows used to return fewer windows without a word
    text = " ".join(records[:3])
    have = len(tok(text, add_special_tokens=False)["input_ids"]) // W
    assert len(token_windows(tok, text, W, have)) == have
    with pytest.raises(ValueError, match=rf"holds {have} windows of {W} tokens, {have + 1} asked for"):
        token_windows(tok, text, W, have + 1)


def test_embedded_at_the_papers_size_names_both_numbers():
    h = pipeline.host("embedded", "cpu")
    with pytest.raises(ValueError, match=r"holds 395 windows of 1024 tokens, 5000 asked for"):
        pipeline.windows(h, "train", 1024, 5000)


def test_txt_and_folders(tok, records, tmp_path):
    # a .txt file is continuous text: its windows are the file's tokens, cut in order (end-of-text at its end only)
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(records) + "\n")
    ids = tok(txt.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // W
    both = [C.windows(tok, str(txt), s, W, None, seed=0) for s in C.SPLITS]
    order = [C.heldout(0, i) for i in range(n)]
    merged = torch.stack([both[h][sum(order[:i]) if h else i - sum(order[:i])] for i, h in enumerate(order)])
    assert torch.equal(merged, torch.tensor(ids[:n * W]).view(n, W))
    # a folder: its files in sorted path order, each record ending with end-of-text
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    _write("jsonl", records[:40], d / "a.jsonl")
    _write("parquet", records[40:], d / "sub" / "b.parquet")
    (d / "notes.md").write_text("not read")
    ref = _reference(tok, records, W, seed=0)
    assert torch.equal(C.windows(tok, str(d), "train", W, len(ref["train"])), ref["train"])


def test_fields_splits_and_bad_specs(tok, records, tmp_path):
    src = _write("jsonl", records, tmp_path / "c.jsonl", field="body")
    with pytest.raises(ValueError, match=r"line 1 has no text field 'text' \(it has \['body', 'id'\]\).*\?field="):
        C.windows(tok, src, "train", W, 2)
    ref = _reference(tok, records, W, seed=0)
    assert torch.equal(C.windows(tok, src + "?field=body", "train", W, 4), ref["train"][:4])
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": records[:5]}),
                          "validation": datasets.Dataset.from_dict({"text": records})}).save_to_disk(str(dd))
    assert torch.equal(C.windows(tok, f"{dd}?split=validation", "train", W, 4), ref["train"][:4])
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], not 'test'"):
        C.windows(tok, f"{dd}?split=test", "train", W, 4)
    with pytest.raises(ValueError, match="unknown option colum; options: field, split, config"):
        C.windows(tok, src + "?colum=body", "train", W, 2)
    with pytest.raises(FileNotFoundError, match="corpus './nothing.jsonl' does not exist"):
        C.windows(tok, "./nothing.jsonl", "train", W, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .txt/.jsonl/.parquet file"):
        C.windows(tok, str(empty), "train", W, 2)


def test_hub_name_offline_says_what_to_do(tmp_path):
    """No hub here: a dataset name that is not in the local datasets cache fails at once, in one line."""
    code = ("from transformers import AutoTokenizer\n"
            "from writesae.hosts import EMBEDDED_DIR\nfrom writesae import corpus as C\n"
            "tok = AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))\n"
            "try:\n    C.windows(tok, 'someone/no-such-corpus', 'train', 16, 2)\n"
            "except FileNotFoundError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    line = next(x for x in r.stdout.splitlines() if x.startswith("ERR"))
    assert "corpus 'someone/no-such-corpus' is not in the local datasets cache (HF_HUB_OFFLINE=1)" in line
    assert "save_to_disk('DIR')" in line and "pass corpus=DIR" in line


def test_an_unreachable_hub_fails_at_once_naming_offline_mode(tmp_path):
    """A hub whose host does not resolve (the .invalid domain never does) fails at once, not after the hub client's
    five retries (23 s), and names HF_HUB_OFFLINE=1 for a dataset that is in the local cache."""
    code = ("import time\nfrom transformers import AutoTokenizer\n"
            "from writesae.hosts import EMBEDDED_DIR\nfrom writesae import corpus as C\n"
            "tok = AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))\nt = time.perf_counter()\n"
            "try:\n    C.windows(tok, 'someone/no-such-corpus', 'train', 16, 2)\n"
            "except FileNotFoundError as e:\n    print('ERR', e)\nprint('SECONDS', time.perf_counter() - t)\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    line = next(x for x in r.stdout.splitlines() if x.startswith("ERR"))
    assert "corpus 'someone/no-such-corpus': the hub (hub.invalid) cannot be reached from here" in line
    assert "in the local datasets cache, set HF_HUB_OFFLINE=1" in line and "pass corpus=DIR" in line
    assert float(r.stdout.split("SECONDS")[1]) < 5 and "Retrying" not in r.stderr


def test_pipeline_keys_states_by_corpus(tok, records, tmp_path):
    h = pipeline.host("embedded", "cpu")
    src = _write("jsonl", records, tmp_path / "c.jsonl")
    spec = pipeline.data_spec(h, [(1, 0)], window=W, n_windows=6, positions_per_seq=2, corpus=src)
    assert spec["corpus"] == src and "corpus" not in pipeline.data_spec(h, [(1, 0)], window=W, n_windows=6)
    cells = spec.pop("cells")
    d = pipeline.states(h, cells, root=tmp_path / "cache", progress=False, **spec)
    assert json.loads((d / "params.json").read_text())["corpus"] == src
    from writesae.data import StateDataset

    ds = StateDataset(d, (1, 0), "all")
    ref = _reference(tok, records, W, 0)["train"][:6]
    meta = {k: torch.as_tensor(v) for k, v in ds.meta().items()}
    assert torch.equal(meta["token_ids"].reshape(6, 2), ref[:, meta["positions"][:2]])
    assert torch.equal(pipeline.windows(h, "heldout", W, 2, 0, corpus=src), _reference(tok, records, W, 0)["heldout"][:2])
