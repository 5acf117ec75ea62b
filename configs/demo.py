# python -m clara_jax.demo --config=configs/demo.py --workdir=workdir/demo   (what `make demo` runs)
"""The embedded default: CLaRa end to end on CPU (15.9 min on the 2-core CPU), on
the synthetic corpus.

A tiny Mistral (hidden 128, 4 layers) is pretrained from scratch on reading lessons and
chat-formatted document-QA, text-RAG and closed-book examples about separate invented worlds
(so the base can answer from text, like the instruct model CLaRa starts from); then stage 1 (SCP), stage 2
(instruct) and stage 3 (end to end) run at each compression rate; evaluation compares closed
book, full text and compressed documents on held-out entities. Override any field with
`--config.field=value` (for example `--config.rates=4,16 --config.stage3.steps=600`).
"""

import ml_collections


def stage(steps: int, learning_rate: float, batch_size: int = 16, **extra):
    c = ml_collections.ConfigDict(dict(steps=steps, learning_rate=learning_rate,
                                       batch_size=batch_size))
    c.update(extra)
    return c


def get_config(arg: str = ""):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = "tiny"
    # Compression rates to run, comma separated. The tiny model passes the demo's check at 2x
    # and 4x (stage 3 raised Recall@1 0.175 -> 0.463 and 0.256 -> 0.688); at 8x and 16x it
    # does not (0.206 -> 0.169, 0.131 -> 0.050): its memory states barely hold the facts a
    # document states once (a linear probe finds the birthplace of 18% of held-out people at
    # 4x, 10% at 16x, chance 3%), so the generator's loss hardly depends on the document and
    # gives the query reasoner no signal. `--config.rates=4,16` shows that.
    c.rates = "2,4"
    c.doc_max_length = 80            # synthetic documents are 40-80 tokens
    # One gold document per question, given alone (oracle) or picked from 20 candidates by
    # the query reasoner (normal). With two documents the tiny generator would also have to
    # tell which memory block is about the person asked for: it does not learn that within
    # the budget (answer loss 0.1 nat lower with the gold document than without, against
    # 1.0 nat with it alone), so two-document questions are left out.
    c.top_k = 1
    c.multi_hop = False
    c.questions_per_entity = 4       # every fact of an entity is asked about
    c.num_candidates = 20            # stage-3 / eval candidates per question, as in the paper
    c.num_entities = 240             # per world
    c.worlds = 24                    # CLaRa trains on their train splits, evaluates on the
                                     # first one's held-out entities. Many worlds, each seen
                                     # about once per stage: with few, the generator learns
                                     # the facts by heart instead of reading its documents.
    c.max_len = 160                  # decoder prompt length (stage 1; 2-3 set their own)
    # Every world shares one map (cities and countries; people and organisations differ), so
    # a birthplace is one of 30 known city names (one token each in the base's vocabulary):
    # reading it from memory tokens is learnable at this size, and guessing it scores 1/30.
    c.places_seed = 0

    # The base LM reads separate invented worlds (seeds from seed + 1000), so it knows none of
    # the facts the stages train and evaluate on; many worlds, each seen about once, so that it
    # learns to read its context rather than to memorise.
    c.base = stage(steps=600, learning_rate=3e-3, batch_size=16, max_len=256, vocab_size=1024,
                   worlds=16)
    # Stage 1 teaches the memory tokens the entity's name (stated in every sentence) far more
    # than its facts (stated once): at 16x, in stage 1's own layout, the gold document lowers
    # the loss of the regenerated questions by 0.79 nat but that of the answers by 0.02 nat.
    # After stage 2 the answer loss with the gold compressed document is 0.21 / 0.05 / 0.06
    # nat (4x / 8x / 16x) below the loss with another entity's. Neither a 3x learning rate
    # nor training the memory-token embeddings (optimize_mem_tokens) raised it at 16x.
    c.stage1 = stage(steps=600, learning_rate=2e-3)
    # Stages 2-3 prompts (instruction, memory slots, question, answer) are at most 102 tokens
    # at 2x, 82 at 4x: 112 instead of max_len's 160 saves a third of the decoder's work.
    c.stage2 = stage(steps=300, learning_rate=2e-3, max_len=112)
    # Stage 3 trains the query reasoner from the generator's loss alone. Stages 1-2 never train
    # it, so it starts cold (PEFT init, B = 0: the base model's own states at the memory
    # tokens) and the rise of Recall@1 is visible; temperature 0.1 (the official 0.02 learns
    # too slowly at this size). 300 steps: with 100, whether Recall@1 rose depended on float
    # rounding (a run with the layers unrolled: 2x 0.163 -> 0.125, 4x 0.138 -> 0.044; 300
    # steps from the same stage-2 models: 0.163 -> 0.269 and 0.138 -> 0.163); lr 4e-3
    # collapsed it (0.056 at both rates).
    c.stage3 = stage(steps=300, learning_rate=2e-3, temperature=0.1, worlds=4, max_len=112)

    # The 4 layers unrolled rather than scanned: 1.11x faster steps on CPU (same parameters).
    c.scan_layers = False
    # Train the rates' stages in concurrent processes, each pinned to its share of the CPUs
    # (on 2 cores: one core per rate, 1.2x the throughput of one two-core process on the
    # tiny model; equal up to float rounding); False trains them one after the other here.
    c.parallel_rates = True

    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 16
    c.eval.batch_size = 16
    c.eval.limit = 0                 # 0: every eval question
    # The demo fails (exit 1) unless compressed F1 (oracle setting) beats closed book and
    # stage 3 raises Recall@1, at every rate.
    c.eval.check = True
    return c
