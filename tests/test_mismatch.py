"""No silent mismatch: an init_from checkpoint's CLaRa fields against the run's (refused, or
adopted on request), and sep=False memory slots at the official stride in both training and
generation."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.clara import generation, prompts
from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.formats.hf_mistral import save_checkpoint
from clara_jax.clara.model import Clara
from clara_jax.clara.splice import memory_slot_positions
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data.pipeline import FeatureSpec, featurize_batch
from clara_jax.errors import UserError
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import Mistral, init_params
from clara_jax.train import init_config, resume
from clara_jax.train import setup as setup_lib
from clara_jax.train import train as train_lib
from config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V0 = 300
WORDS = [f"{a} of the {c} was born in {d}." for a in "Ana Bo Cy Dee Eli Fay".split()
         for c in "city firm band".split() for d in "1901 1922 1933".split()]


def tiny_clara(tok_path, *, doc_max_length=16, compress_rate=4, sep=True, rank=4):
    cfg = ClaraConfig(doc_max_length=doc_max_length, compress_rate=compress_rate, sep=sep,
                      generation_top_k=2, first_mem_token_id=V0,
                      lora=LoraConfig(rank=rank, alpha=2.0 * rank))
    model_cfg = MistralConfig(vocab_size=V0 + cfg.num_added_tokens, hidden_size=32,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64)
    params = init_params(model_cfg, jax.random.key(0))
    adapters = setup_lib.fresh_adapters(model_cfg, cfg.lora, jax.random.key(1))
    tok = ClaraTokenizer.from_file(tok_path, cfg.n_mem, cfg.different_mem_tokens)
    return Clara(model_cfg, cfg, params, adapters, tok, tokenizer_path=tok_path,
                 merge_adapters=False, share_prefix=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved Clara (doc_max_length 16, compress_rate 4, sep, rank 4), a work directory
    holding it under model/, an Apple release's config.json, and a base checkpoint."""
    root = tmp_path_factory.mktemp("ckpts")
    tok_path = train_sentencepiece(WORDS * 20, str(root / "sp"), V0)
    model = tiny_clara(tok_path)
    model.save(str(root / "clara"))
    (root / "workdir").mkdir()
    os.symlink(root / "clara", root / "workdir" / "model")
    apple = root / "apple"
    apple.mkdir()
    (apple / "config.json").write_text(json.dumps({"doc_max_length": 16, "compr_rate": 4,
                                                   "sep": True, "different_mem_tokens": True,
                                                   "lora_r": 4}))
    (apple / "adapters.pth").write_bytes(b"")
    save_checkpoint(str(root / "base"), model.model_config, model.params, tok_path)
    return {"root": root, "tok_path": tok_path, "model": model}


def run_config(init_from, **fields):
    c = load_config("configs/instruct.py")
    c.init_from = str(init_from)
    c.doc_max_length, c.compress_rate, c.lora_rank = 16, 4, 4
    for k, v in fields.items():
        c[k] = v
    return c


# -- init_from -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["clara", "workdir", "apple"])
def test_matching_checkpoint_passes_and_each_format_is_read(saved, where):
    path = saved["root"] / where
    setup_lib.validate_config(run_config(path), n_devices=8)
    assert init_config.checkpoint_fields(str(path))["compress_rate"] == 4
    c = run_config(path, compress_rate=8)
    with pytest.raises(UserError, match=f"^init_from {path}: compress_rate 4 in the "
                                        f"checkpoint, 8 in the config"):
        setup_lib.validate_config(c, n_devices=8)


def test_mismatch_names_every_field_both_values_and_the_vocabulary(saved):
    path = saved["root"] / "clara"
    c = run_config(path, compress_rate=8, sep=False, lora_rank=8)
    with pytest.raises(UserError) as e:
        setup_lib.validate_config(c, n_devices=8)
    assert str(e.value) == (
        f"init_from {path}: compress_rate 4 in the checkpoint, 8 in the config; sep True in "
        f"the checkpoint, False in the config; lora_rank 4 in the checkpoint, 8 in the config; "
        f"added tokens 7 in the checkpoint (vocabulary 307), 5 in the config (vocabulary 307) "
        f"(set config.compress_rate=4, config.sep=True, config.lora_rank=4, or "
        f"config.adopt_checkpoint_config=True to take the checkpoint's)")
    c = run_config(path, doc_max_length=32, different_mem_tokens=False)
    with pytest.raises(UserError, match=r"doc_max_length 16 in the checkpoint, 32 in the "
                                        r"config; different_mem_tokens True in the checkpoint, "
                                        r"False in the config; added tokens 7 in the checkpoint "
                                        r"\(vocabulary 307\), 4 in the config"):
        setup_lib.validate_config(c, n_devices=8)


def test_base_checkpoint_and_base_lm_are_not_compared(saved):
    assert init_config.checkpoint_fields(str(saved["root"] / "base")) is None
    setup_lib.validate_config(run_config(saved["root"] / "base", compress_rate=8), n_devices=8)


def test_adopt_takes_the_checkpoint_values_and_says_which(saved, capsys):
    path = saved["root"] / "clara"
    c = run_config(path, compress_rate=8, sep=False, adopt_checkpoint_config=True)
    setup_lib.validate_config(c, n_devices=8)   # the flag accepts the difference
    out = init_config.adopt(c)
    assert (out.compress_rate, out.sep, out.doc_max_length) == (4, True, 16)
    assert (c.compress_rate, c.sep) == (8, False)   # the caller's config is not changed
    assert capsys.readouterr().out.splitlines() == [
        f"adopt_checkpoint_config: compress_rate 4 from {path} (the config had 8)",
        f"adopt_checkpoint_config: sep True from {path} (the config had False)"]
    setup_lib.validate_config(out, n_devices=8)
    same = run_config(path, adopt_checkpoint_config=True)
    assert init_config.adopt(same) is same and capsys.readouterr().out == ""


def test_train_command_refuses_before_writing_anything(saved, tmp_path):
    """Exit status 2, the one-line message on stderr, and an untouched work directory."""
    work = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "clara_jax.train", "--config=configs/instruct.py",
         f"--workdir={work}", f"--config.init_from={saved['root'] / 'workdir'}",
         "--config.doc_max_length=16", "--config.compress_rate=8", "--config.lora_rank=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"init_from {saved['root'] / 'workdir'}: compress_rate 4 in the checkpoint, 8 in " \
           f"the config" in last
    assert not work.exists() or not any(work.iterdir())


# -- sep=False ---------------------------------------------------------------------------------

def official_positions(ids, mem0, k, n, sep):
    """apple/ml-clara modeling_clara.py:925-944: from the first <MEM0> of each row, document j
    fills the n positions from first + j * (n + sep)."""
    first = np.argmax(np.asarray(ids) == mem0, axis=1)
    slot = n + (1 if sep else 0)
    return np.stack([f + np.concatenate([j * slot + np.arange(n) for j in range(k)])
                     for f in first])


@pytest.mark.parametrize("sep", [False, True])
def test_training_and_generation_use_the_official_stride(saved, sep):
    tok = saved["model"].tokenizer
    n, k = tok.n_mem, 3
    qs, answers = ["Where was Ana born?", "Who founded the firm?"], ["Zan", "Bo"]
    # training: the pipeline's prompt -> the loss's positions; the builder's own positions
    spec = FeatureSpec(stage="instruct", doc_max_length=16, n_mem=n, max_len=320, k=k, sep=sep)
    recs = [{"question": q, "docs": WORDS[:k], "answers": [a], "pos_index": [],
             "source": f"t:{i}"} for i, (q, a) in enumerate(zip(qs, answers))]
    ids = featurize_batch(recs, tok, spec)["prompt_ids"]
    train_pos = np.asarray(memory_slot_positions(jnp.asarray(ids), tok.mem_token_ids[0], k, n,
                                                 sep))
    built = prompts.instruct(tok, qs, answers, k=k, max_len=320, sep=sep)
    np.testing.assert_array_equal(built.mem_positions, train_pos)
    np.testing.assert_array_equal(train_pos, official_positions(ids, tok.mem_token_ids[0], k, n,
                                                                sep))
    # generation: the prompts Clara splices into
    gen = generation.memory_prompts(tok, qs, k, "instruct", 64, sep=sep)
    np.testing.assert_array_equal(
        gen.mem_positions, official_positions(gen.input_ids, tok.mem_token_ids[0], k, n, sep))
    rel = gen.mem_positions - np.argmax(gen.input_ids == tok.mem_token_ids[0], axis=1)[:, None]
    np.testing.assert_array_equal(rel, train_pos - train_pos[:, :1])
    # the prompt text keeps <SEP> after every document either way; without sep, document 1
    # starts on document 0's <SEP> and the last k - 1 placeholders are not written
    row = gen.input_ids[0]
    first = int(np.argmax(row == tok.mem_token_ids[0]))
    assert (row[first + n: first + k * (n + 1): n + 1] == tok.sep_token_id).all()
    written = set(gen.mem_positions[0].tolist())
    if sep:
        assert row[gen.mem_positions[0]].tolist() == tok.mem_token_ids * k
    else:
        assert row[gen.mem_positions[0, n]] == tok.sep_token_id
        assert written == set(range(first, first + k * n))


def test_clara_without_sep_splices_at_the_official_positions(saved):
    """Clara's answers from states equal a decode from embeddings spliced by the official rule
    (and differ from the sep=True positions, so the comparison can fail)."""
    base = saved["model"]
    # weights 30x the init scale: a random model whose answer depends on its input
    params = jax.tree_util.tree_map(lambda x: x * 30.0 if x.ndim >= 2 else x, base.params)
    model = Clara(base.model_config, base.config.replace(sep=False), params, base.adapters,
                  base.tokenizer, merge_adapters=False, share_prefix=False)
    tok, n, k = model.tokenizer, model.config.n_mem, 2
    qs = ["Where was Ana born?", "Who is Bo?"]
    states = 3.0 * np.random.default_rng(0).standard_normal(
        (len(qs), k, n, model.model_config.hidden_size)).astype(np.float32)
    out = model.generate_from_compressed_documents_and_questions(qs, states, max_new_tokens=6,
                                                                 adapter=None)
    batch = generation.memory_prompts(tok, qs, k, "instruct", model.length_bucket, sep=False)

    def decode(sep):
        pos = official_positions(batch.input_ids, tok.mem_token_ids[0], k, n, sep)
        ids = generation._generate_spliced(
            model.model, model.params, None, jnp.asarray(batch.input_ids),
            jnp.asarray(batch.attention_mask), jnp.asarray(pos),
            jnp.asarray(states.reshape(len(qs), k * n, -1)), max_new_tokens=6,
            eos_id=tok.eos_id, pad_id=tok.pad_id)
        return generation._decoded(tok, ids)[1]

    assert out.token_ids == decode(False)
    assert decode(True) != decode(False)


def test_adopted_run_trains_and_records_the_checkpoint_values(saved, tmp_path, capsys):
    """A one-step instruct run from the saved Clara under compress_rate 8 / sep False with
    adopt_checkpoint_config: it trains with the checkpoint's 4 / True, records them in
    config.json (what a resume compares) and exports them; the flag itself is free on resume."""
    c = run_config(saved["root"] / "clara", compress_rate=8, sep=False,
                   adopt_checkpoint_config=True, total_steps=1, batch_size=8, log_every=1,
                   eval_every=1000, checkpoint_every=1000, max_len=320, generation_top_k=2)
    c.data.synthetic_entities = 20
    summary = train_lib.train(c, str(tmp_path))
    assert "adopt_checkpoint_config: compress_rate 4 from" in capsys.readouterr().out
    recorded = json.load(open(tmp_path / "config.json"))
    assert (recorded["compress_rate"], recorded["sep"]) == (4, True)
    exported = json.load(open(os.path.join(summary["model_dir"], "clara_config.json")))
    assert (exported["compress_rate"], exported["sep"]) == (4, True)
    assert resume.field_kind("adopt_checkpoint_config", recorded) == "free"
