"""
The LM head as each HF family applies it, and the per-token log-probs of a batch's responses through it: the one
head path every objective (objectives.py, rl.py), the reference cache and the load-time self-check share.

Log-probs: the token at position t+1 is scored by the logits at position t, and only response tokens count (prompt
and padding are masked). The logits are the model's own: head_of reproduces what each HF family does after its LM
head (bias, logit scale, soft cap), and check_head refuses a model it does not match. The log-probs never hold the
[tokens x vocab] logits (bipost_kernels/logprob.py). response_mask: bool or 0/1 of any integer dtype.
"""
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bipost_kernels.logprob import token_logprobs
import packing  # padding-free rows: the examples laid end to end, positions restarting (packing.py)


class Head(NamedTuple):
    """An LM head as its model's own forward applies it: logits = softcap·tanh(scale·module(hidden) / softcap)
    (module: the output embeddings, weight [V, H] and maybe a bias; no cap when softcap is None)."""
    module: torch.nn.Module
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden):
        """Full fp32 logits, through a call of the module: under ZeRO-3 only a call gathers its weight."""
        return self._finish(self.module(hidden))

    def _finish(self, logits):
        logits = logits.float() * self.scale
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    def logprobs(self, hidden, targets, mask, fused, grad_hint=None):
        """Per-token log-probs of targets (0 where mask is 0), never holding the logits (bipost_kernels/logprob.py).
        The fused op runs as the head module's forward, for this call only: under ZeRO-3 the module's own hooks then
        gather its partitioned weight for the forward, gather it again before the op's backward (the op saves the
        parameter itself, whose data the gather restores) and reduce-scatter its gradient, as DeepSpeed's ZeRO-3
        Linear does; elsewhere the hooks are absent and it is a plain call."""
        module = self.module

        def forward(hidden):  # hidden: the call's argument, which ZeRO-3's hooks may have wrapped
            weight, bias = module.weight, getattr(module, 'bias', None)
            if torch.is_autocast_enabled(hidden.device.type):  # plain torch: fp32 master weights, matmuls in the autocast dtype
                dtype = torch.get_autocast_dtype(hidden.device.type)
                hidden, weight, bias = hidden.to(dtype), weight.to(dtype), (None if bias is None else bias.to(dtype))
            return token_logprobs(hidden, weight, targets, mask, fused=fused, bias=bias, scale=self.scale,
                                  softcap=self.softcap, grad_hint=grad_hint)

        return self._as_forward(forward, hidden)

    def cross_entropy(self, hidden, teacher, teacher_hidden, chunk=None):
        """Per row of hidden [N, H]: −Σ_v p_teacher(v) log p_student(v) (fp32), the teacher's distribution from its
        Head on teacher_hidden [N, H']. Rows go in chunks (default: ~2^26 logits, 256 MB in fp32), each checkpointed:
        its student and teacher logits are recomputed in the backward, so that at most one chunk of each exists at a
        time, never an [N, V] array. Runs as the head module's forward, as logprobs does: under ZeRO-3 the hooks
        gather the student's weight once for the forward and once for the backward (not once per chunk) and
        reduce-scatter its gradient. The teacher's head is called per chunk (its hooks gather it)."""
        module = self.module

        def logits(hidden):  # inside this module's forward: its weight directly (gathered by then under ZeRO-3)
            return self._finish(F.linear(hidden, module.weight, getattr(module, 'bias', None)))

        def chunk_losses(hidden, teacher_hidden):
            with torch.no_grad():  # (a model distilled from itself: its head's forward is this one, not a plain call)
                teacher_probs = (logits if teacher.module is module else teacher.logits)(teacher_hidden).softmax(-1)
            return -(teacher_probs * logits(hidden).log_softmax(-1)).sum(-1)

        def forward(hidden):
            rows = chunk or max(16, 2 ** 26 // module.weight.shape[0])  # V: the weight is gathered here under ZeRO-3
            losses = [checkpoint(chunk_losses, hidden[i:i + rows], teacher_hidden[i:i + rows], use_reentrant=False)
                      for i in range(0, hidden.shape[0], rows)]
            return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)

        return self._as_forward(forward, hidden)

    def _as_forward(self, forward, hidden):
        """forward(hidden) run as the head module's forward, for this call only."""
        module = self.module
        own = module.__dict__.get('forward')  # an instance-level forward (e.g. accelerate's) is put back as it was
        module.forward = forward
        try:
            return module(hidden)
        finally:
            if own is None:
                del module.forward
            else:
                module.forward = own


def head_of(model):
    """The model's LM head with what its family's *ForCausalLM.forward does right after `self.lm_head(...)`
    (transformers 5.x): a logit scale and a final soft cap, read from the config. A head bias is the module's own.
    Anything else (a family missed here) is caught by check_head."""
    config, family = model.config.get_text_config(), model.config.model_type
    scale = 1.0
    if family.startswith('cohere'):                             # logits * logit_scale
        scale = config.logit_scale
    elif family.startswith('granite') or family == 'minicpm3':  # logits / logits_scaling (MiniCPM3 divides the
        scale = 1 / config.logits_scaling                       # hidden states instead: the same, no head bias)
    elif family == 'hyperclovax':                               # logits * logits_scaling (the opposite of Granite)
        scale = config.logits_scaling
    elif family == 'falcon_h1':                                 # logits * lm_head_multiplier
        scale = config.lm_head_multiplier
    # cap·tanh(logits/cap): Gemma 2/3/3n/4, VaultGemma, NanoChat; RecurrentGemma; xLSTM (None: no cap)
    softcap = next((getattr(config, key) for key in ('final_logit_softcapping', 'logits_soft_cap', 'output_logit_soft_cap')
                    if getattr(config, key, None) is not None), None)
    return Head(model.get_output_embeddings(), float(scale), softcap)


def body_and_head(model):
    """The transformer without its LM head (its output is the final-normed hidden states), and the Head:
    the fused kernels take hidden states + head weight. A peft (LoRA) model's base_model is peft's wrapper: the
    transformer is that of the causal LM it wraps (adapters inside)."""
    if hasattr(model, 'get_base_model'):
        model = model.get_base_model()
    return model.base_model, head_of(model)


def check_head(model, tolerance=1e-3):
    """Raise ValueError unless bipost's per-token log-probs equal the model's own, model(ids).logits.log_softmax(-1)
    gathered, on a short random probe: a model whose forward forms its logits in a way head_of does not know is
    refused rather than trained on wrong log-probs. For an fp32 model (bipost runs it on CPU, before any cast or
    ZeRO-3 partitioning); NaN where both give NaN counts as equal."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'response_mask': torch.ones_like(ids)}
    training = model.training
    model.eval()  # no dropout: both forwards must run the same network
    with torch.no_grad():
        ours, _ = response_logprobs(model, batch, SimpleNamespace(fused_kernels=False))
        logits = model(input_ids=ids, attention_mask=batch['attention_mask']).logits.float()
    model.train(training)
    name = f"{type(model).__name__} (model_type '{model.config.model_type}')"
    if logits.shape[-1] != vocab:
        raise ValueError(f"{name} returns {logits.shape[-1]} logits per token but its LM head has {vocab} rows: "
                         f"bipost cannot reproduce its log-probs; use another model")
    theirs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=tolerance, equal_nan=True):
        raise ValueError(f"{name}: bipost's log-probs differ from the model's own by up to "
                         f"{(ours - theirs).abs().max():.3g}: its forward forms its logits in a way lm_head.head_of "
                         f"does not reproduce (it knows lm_head(base_model output) with a head bias, a logit scale and "
                         f"a final soft cap); add this family to head_of, or use another model")


def check_packing(model, name, tolerance=1e-4):
    """Raise ValueError unless the model's packed per-token log-probs equal its padded ones on a short random probe:
    rows of 4, 9 and 5 tokens (packed: the 9 alone, then the 5 and the 4 in one row, so that attention leaking from
    one example into the next shows). For an fp32 model on the CPU, before any cast, LoRA or ZeRO-3 partitioning."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = (torch.arange(9) < torch.tensor([[4], [9], [5]])).long().to(model.device)
    batch = {'input_ids': ids, 'attention_mask': mask, 'response_mask': mask}
    training = model.training
    model.eval()  # no dropout: both forwards must run the same network
    with torch.no_grad():
        padded, _ = response_logprobs(model, batch, SimpleNamespace(fused_kernels=False, packing=False))
        packed, _ = response_logprobs(model, batch, SimpleNamespace(fused_kernels=False, packing=True))
    model.train(training)
    if not torch.allclose(packed, padded, rtol=tolerance, atol=tolerance):
        raise ValueError(f"{name} ({type(model).__name__}, attn_implementation "
                         f"'{model.config._attn_implementation}'): packed rows give log-probs that differ from padded "
                         f"ones by up to {(packed - padded).abs().max():.3g} (its attention does not confine itself to "
                         f"each example from restarting position ids); set packing=False")


def response_logprobs(model, batch, ctx, grad_hint=None):
    """Per-token log-probs [B, L-1] (fp32) of the response tokens, 0 elsewhere, and the mask [B, L-1] (bool).
    grad_hint: d loss / d log-prob up to a scalar, if known now (bipost_kernels/logprob.py: the head's gradients in the forward).
    ctx.packing: the body runs on packed rows (packing.py), the head on their [S, H] hidden states; the same numbers."""
    body, head = body_and_head(model)
    hidden, layout = packing.scoring_hidden(body, batch, getattr(ctx, 'packing', False))  # packed: [S, H], no padding
    targets, mask = batch['input_ids'][:, 1:], batch['response_mask'][:, 1:].bool()
    logps = head.logprobs(hidden, packing.gather(targets, layout), packing.gather(mask, layout),
                          fused=None if ctx.fused_kernels else False,
                          grad_hint=None if grad_hint is None else packing.gather(grad_hint, layout))
    return packing.spread(logps, layout, mask.shape), mask
