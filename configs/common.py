"""Shared pieces of the stage configs: argument parsing and the fields every stage has.

Official defaults (apple/ml-clara scripts/*.sh and openrlhf/cli/train_sft.py):
doc_max_length 256, compress_rate 32, LoRA r 16 (alpha 2r, dropout 0.1), AdamW betas
(0.9, 0.95), cosine schedule to 0.1 x lr after a 3% warmup, max grad norm 1.0, mse weight
0.1, generation_top_k 5, 20 candidates in stage 3, top-k temperature 0.02; the stage files
set what differs per stage (stage 1 trains the memory-token embeddings, stage 3 uses lr 5e-6
constant, batch 32, max_len 1024). The official stage transitions are the defaults
(`instruct.decoder_init`, `end_to_end.query_reasoner_init`). The `tiny` model shrinks lengths
and steps so a stage runs on a CPU in about a minute; everything else keeps the official
values unless a config says why (docs/training.md, "Official stage transitions and
defaults").
"""

import ml_collections


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
    """`key=value,key=value` after the colon of `--config=file.py:...` -> ConfigDict, typed
    like the defaults; unknown keys raise."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def base_config(stage: str, model: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model = model
    c.init_from = ""           # start checkpoint: a workdir, a saved Clara, a converted HF base
    # A CLaRa init_from whose compress_rate, doc_max_length, different_mem_tokens, sep or
    # lora_rank differ from this config is refused naming each; True takes the checkpoint's
    # values instead (and prints which).
    c.adopt_checkpoint_config = False
    c.seed = 0
    tiny = model == "tiny"
    c.total_steps = 300 if tiny else 10_000
    c.batch_size = 16 if tiny else 128
    c.grad_accum = 1
    c.learning_rate = 1e-3 if tiny else 1e-4
    c.warmup_ratio = 0.03
    # "cosine": linear warmup over warmup_ratio of the steps, then cosine to min_lr_ratio x
    # learning_rate (the official `cosine_with_min_lr`, stages 1 and 1_2); "constant":
    # learning_rate at every step, no warmup (the official `--lr_scheduler constant` of
    # stage 2, configs/end_to_end.py).
    c.lr_schedule = "cosine"
    c.min_lr_ratio = 0.1
    c.b1, c.b2 = 0.9, 0.95
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.dropout = True           # LoRA dropout 0.1 in training, as officially
    c.on_nonfinite = "stop"    # or "skip": leave the state unchanged and go on
    c.max_skipped_fraction = 0.1   # on_nonfinite=skip: more skipped steps than this diverged
    # When a run has diverged (clara_jax/train/divergence.py; docs/training.md, "Divergence"):
    # grad norm exactly 0 at zero_grad_rows log rows in a row; the loss within
    # chance_tolerance nats of ln(vocabulary) at chance_rows log rows in a row after the
    # warm-up; a trained parameter non-finite or above max_abs_param (never checkpointed).
    # 0 rows turns a check off.
    c.divergence = ml_collections.ConfigDict()
    c.divergence.zero_grad_rows = 3
    c.divergence.chance_rows = 5
    c.divergence.chance_tolerance = 1e-3
    c.divergence.max_abs_param = 1e6
    c.log_every = 10
    c.eval_every = 100 if tiny else 1000
    c.eval_batches = 4
    c.checkpoint_every = 100 if tiny else 1000
    c.keep_checkpoints = 2
    # Resuming (docs/training.md, "Resuming safely"): optimisation / data fields allowed to
    # differ from the recorded run (comma-separated names, e.g. "learning_rate,batch_size"),
    # and what a checkpoint failing its checksum manifest does: "fallback" to the previous
    # intact step, or "refuse".
    c.resume_overrides = ""
    c.on_corrupt_checkpoint = "fallback"
    c.peak_flops = 0.0         # peak FLOP/s per device (e.g. 197e12 v5e bf16); > 0 adds `mfu`
    c.compiled_step = ""       # a train step serialised by `python -m clara_jax.aot --serialize`

    c.doc_max_length = 64 if tiny else 256
    c.compress_rate = 4 if tiny else 32
    c.max_len = 256 if tiny else 2048
    c.query_max_length = 0     # 0: queries encoded like documents (doc_max_length)
    c.generation_top_k = 5
    c.num_candidates = 20
    c.pretrain_k = 1           # documents per SCP record
    c.sep = True
    c.different_mem_tokens = True
    c.mse_weight = 0.1
    c.temperature = 0.02
    c.retrieval_temperature = 0.02
    c.lora_rank = 16
    c.lora_alpha = ml_collections.config_dict.placeholder(float)   # None: 2 x lora_rank
    c.lora_dropout = 0.1       # on the adapters' input, in training only (with c.dropout)
    # Also train the memory tokens' embedding rows (<MEM0..n-1>; not <AE>/<ENC>/<SEP>, not
    # lm_head). Officially only stage 1 does (train_sft.py sets optimize_mem_tokens=True, and
    # in later stages loading the checkpoint's adapters through PEFT freezes the embeddings
    # again): configs/pretrain.py turns it on, the other stages leave it off.
    c.optimize_mem_tokens = False
    # Execution settings of the model (None: the preset's / checkpoint's value); parameters
    # and checkpoints do not depend on them. remat_policy: none | full | dots | dots_no_batch;
    # attention_impl: xla | cudnn.
    c.remat_policy = ml_collections.config_dict.placeholder(str)
    c.scan_layers = ml_collections.config_dict.placeholder(bool)
    c.attention_impl = ml_collections.config_dict.placeholder(str)

    c.instruct = ml_collections.ConfigDict()
    # Stage 2 (instruct)'s decoder adapter at the start: "fresh" (official: `from_pretrained`
    # skips a stage-1 checkpoint's decoder adapter for stage1_2 and `_setup_lora_adapters`
    # adds a new one) starts a new one (LoRA A random, B = 0), the answers then learnt from
    # the instruction data alone; "keep" continues stage 1's decoder (the demo, whose
    # 150-step stage 2 builds on it). The encoder adapter is kept either way.
    c.instruct.decoder_init = "fresh"

    c.end_to_end = ml_collections.ConfigDict()
    # Stage 3: compress every distinct candidate once (eval mode) into
    # {workdir}/candidate_cache and gather its states in the step instead of running the
    # frozen encoder; False recompresses every step with LoRA dropout, as officially.
    c.end_to_end.cache_candidates = True
    # The query reasoner at the start of end_to_end / retrieval_pretrain
    # (setup.initial_query_reasoner): "auto" (official) copies the encoder adapter when the
    # start has no trained query reasoner (none in Apple's stage-1 / 1_2 checkpoints; an
    # untrained one, all LoRA B = 0, in ours of stages 1-2), so questions start in the space
    # of the compressed documents, and keeps a trained one (a start from an end_to_end
    # checkpoint); "encoder" always copies the encoder; "keep" keeps the start's (cold after
    # stages 1-2: the base's own states; the demo, which shows Recall@1 rise from there).
    # A copy of the encoder has its LoRA B times query_reasoner_init_scale (below 1: a
    # weakened warm start).
    c.end_to_end.query_reasoner_init = "auto"
    c.end_to_end.query_reasoner_init_scale = 1.0
    # Stage 3 trains the decoder adapter with the query reasoner, as officially; False trains
    # the query reasoner alone against the frozen generator (its loss still the only signal).
    c.end_to_end.train_decoder = True

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""    # JSONL paths or globs; empty: the synthetic corpus (generated)
    c.data.eval_files = ""
    c.data.skip_invalid = False
    c.data.worker_count = 0
    c.data.synthetic_entities = 240

    c.mesh = ml_collections.ConfigDict()
    c.mesh.dcn_data = 1        # data parallelism across slices (DCN); folded into `data`
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
