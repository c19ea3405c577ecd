"""Single-turn sampler time of this checkout, to compare two commits in separate processes.

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/sampler_before_after.py before
    PYTHONPATH=. python benchmarks/sampler_before_after.py after

A random float32 Llama (hidden 256, 4 layers, vocabulary 2048), 32 prompts of 64 tokens, 64 new
tokens at temperature 1, EOS off; one warm-up call, then the median of 15 timed calls.
"""
import os
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from jaxrl_llm import models
from jaxrl_llm.rollout import generate
d=os.path.join(tempfile.gettempdir(), 'jaxrl_llm_sampler_before_after')
if not os.path.exists(d):
    cfg=transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0); transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
m=models.from_pretrained(d)
ids=np.random.RandomState(0).randint(1,2048,(32,64)).astype(np.int32); mask=np.ones_like(ids)
f=lambda: jax.block_until_ready(generate(m, ids, mask, max_new_tokens=64, rng=jax.random.key(0), eos_token_id=None).tokens)
f()
ts=[]
for _ in range(15):
    t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
print(sys.argv[1], "median %.4f s" % np.median(ts))
