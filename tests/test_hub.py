"""sunfish.hub: a checkpoint exported as a Hugging Face folder loads back to the same model, its card
says what it is, transformers reads its config and tokenizer, and a push to a local folder lands."""

from __future__ import annotations

import json

import pytest
import torch

from sunfish.hub import CARD, MODEL_TYPE, from_pretrained, push_to_hub, register_auto_config, save_pretrained
from sunfish.training.checkpoint import CheckpointError, load_checkpoint
from tests.ckpt_fixtures import build_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_checkpoints(tmp_path_factory.mktemp("hub"))


@pytest.mark.parametrize("kind", ["staged", "diffusion"])
def test_export_loads_back_to_the_same_weights(ckpts, tmp_path, kind):
    out = save_pretrained(ckpts[kind], tmp_path / "export", metrics={"val_bpb": 1.25})
    assert not (out / "optimizer.pt").exists()
    model, meta, tok = from_pretrained(out)
    original = load_checkpoint(ckpts[kind])[0]
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(original.state_dict().items())):
        assert torch.equal(a, b), k
    assert tok.eos_id is not None and meta["model_type"] == MODEL_TYPE
    card = (out / CARD).read_text()
    # the fixture checkpoints record no training data: the card says so instead of guessing
    assert card.startswith("---\nlibrary_name: sunfish") and "license: other" in card
    assert "not recorded in this checkpoint" in card and "datasets:" not in card
    assert "| val_bpb | 1.25 |" in card and "parameters" in card and "## Limitations" in card


def test_transformers_reads_the_exported_config_and_tokenizer(ckpts, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = save_pretrained(ckpts["staged"], tmp_path / "export")
    register_auto_config()
    register_auto_config()  # twice is harmless
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == MODEL_TYPE and config.kind == "staged"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token is not None and tok.pad_token is not None


def test_export_refuses_to_overwrite_and_push_copies_to_a_local_folder(ckpts, tmp_path):
    out = save_pretrained(ckpts["staged"], tmp_path / "export")
    with pytest.raises(CheckpointError, match="not empty"):
        save_pretrained(ckpts["staged"], out)
    assert save_pretrained(ckpts["staged"], out, overwrite=True) == out
    mirror = tmp_path / "mirror" / "sunfish-stage_0"
    assert push_to_hub(out, str(mirror)) == str(mirror)
    assert json.loads((mirror / "config.json").read_text())["model_type"] == MODEL_TYPE
    assert from_pretrained(mirror)[1]["step"] == 3
    with pytest.raises(CheckpointError, match="not an exported folder"):
        push_to_hub(ckpts["staged"], str(tmp_path / "other"))  # a raw checkpoint has no model card


def test_a_hub_id_offline_fails_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="could not fetch 'nobody/no-such-model'"):
        from_pretrained("nobody/no-such-model")


def test_a_failed_export_leaves_nothing_behind(ckpts, tmp_path, monkeypatch):
    import sunfish.hub as hub

    monkeypatch.setattr(hub, "model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(ckpts["staged"], tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_the_card_names_the_data_the_checkpoint_recorded():
    from sunfish.hub import card_data, model_card

    meta = {"kind": "staged", "model_name": "stage_0", "step": 3, "data": {"source": "tinystories"}}
    card = model_card(meta)
    assert "license: cdla-sharing-1.0" in card and "- roneneldan/TinyStories" in card
    assert card_data({"data": {"source": "my_corpus.txt"}}) == {"source": "my_corpus.txt", "dataset": None,
                                                              "license": "other"}
    assert "check the licence of that data" in model_card({**meta, "data": {"source": "my_corpus.txt"}})
