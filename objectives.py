"""
The post-training objectives, one plain function each, all with one signature:

    losses, metrics = objective(model, batch, ctx)

model: an HF causal LM (the raw module, also under DeepSpeed). batch: dict from bipost.get_batch with
input_ids/attention_mask/response_mask [B, L] (for 'pref' data: 2B rows, chosen rows first; for 'prompt' data,
RL's: the prompts alone, left-padded, and each record's extra fields). ctx: a namespace with the frozen
reference/teacher and the hyperparameters. losses: one value per example (per pair for DPO, per prompt for RL),
so that the trainer can weight examples (bilevel data selection) before the mean.
metrics: name -> detached per-example tensor, averaged by the trainer. A metric named 'loss' is the objective's
value where the trained loss adds a regulariser (DPO + NLL) or is a surrogate (RL: −mean reward): logs, evals,
maxright and f* use it.

Log-probs: the token at position t+1 is scored by the logits at position t, and only response tokens
count (prompt and padding are masked). SFT and KD are means over an example's response tokens, then
the trainer averages examples: every example counts the same whatever its length (the f* in a config
must be measured the same way). The logits are the model's own: head_of reproduces what each HF family
does after its LM head (bias, logit scale, soft cap), and check_head refuses a model it does not match.
response_mask: bool or 0/1 of any integer dtype.
"""
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bipost_kernels.logprob import token_logprobs
from bipost_kernels.dpo import dpo_losses
import rl as reinforcement_learning  # rl.py uses this module's head path; each reads the other only at call time
import reward_model  # the same: it reads body_and_head at call time


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
                         f"{(ours - theirs).abs().max():.3g}: its forward forms its logits in a way objectives.head_of "
                         f"does not reproduce (it knows lm_head(base_model output) with a head bias, a logit scale and "
                         f"a final soft cap); add this family to head_of, or use another model")


def response_logprobs(model, batch, ctx, grad_hint=None):
    """Per-token log-probs [B, L-1] (fp32) of the response tokens, 0 elsewhere, and the mask [B, L-1] (bool).
    grad_hint: d loss / d log-prob up to a scalar, if known now (bipost_kernels/logprob.py: the head's gradients in the forward)."""
    body, head = body_and_head(model)
    hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1]
    targets, mask = batch['input_ids'][:, 1:], batch['response_mask'][:, 1:].bool()
    return head.logprobs(hidden, targets, mask, fused=None if ctx.fused_kernels else False, grad_hint=grad_hint), mask


def sft(model, batch, ctx):
    mask = batch['response_mask'][:, 1:].bool()
    tokens = mask.sum(1).clamp(min=1)
    hint = None  # the caller backpropagates Σ_b w_b·loss_b times a scalar, w = batch['weights'] or 1: known now
    if getattr(ctx, 'grads_in_forward', False):
        hint = (-batch.get('weights', 1.0) / tokens)[:, None].expand(mask.shape)
    logps, mask = response_logprobs(model, batch, ctx, grad_hint=hint)
    losses = -logps.sum(1) / tokens
    return losses, {'tokens': tokens.float()}


def dpo(model, batch, ctx):
    logps, mask = response_logprobs(model, batch, ctx)
    if getattr(ctx, 'reference_cache', None) is not None:  # precomputed: per-sequence sums, no reference forward
        reference_logps = reference_sum = ctx.reference_cache.sums(batch)
    else:
        with torch.no_grad():
            reference_logps, _ = response_logprobs(ctx.reference, batch, ctx)
        reference_sum = reference_logps.sum(1)
    losses, _, _ = dpo_losses(  # (the per-sequence values it also returns are the loss's: means where it uses means)
        logps, reference_logps, mask, ctx.beta, loss_type=ctx.dpo_loss, label_smoothing=ctx.label_smoothing,
        length_normalize=ctx.length_normalize, fused=None if ctx.fused_kernels else False)
    B = losses.shape[0]
    # logged with TRL's meaning whatever the loss uses (means for IPO and length_normalize): summed response
    # log-probs, and rewards β·(log πθ(y|x) − log πref(y|x)) of those sums
    policy_sum = logps.detach().sum(1)
    rewards = ctx.beta * (policy_sum - reference_sum)
    chosen, rejected = rewards[:B], rewards[B:]
    metrics = {'rewards/chosen': chosen, 'rewards/rejected': rejected, 'rewards/margins': chosen - rejected,
               'rewards/accuracies': (chosen > rejected).float(),
               'logps/chosen': policy_sum[:B], 'logps/rejected': policy_sum[B:]}
    if ctx.dpo_nll_weight > 0:  # RPO: NLL on the chosen response keeps its likelihood from sinking
        nll = -logps[:B].sum(1) / mask[:B].sum(1).clamp(min=1)
        metrics.update(loss=losses.detach(), nll=nll.detach())  # the DPO loss alone is what evals report as f
        losses = losses + ctx.dpo_nll_weight * nll
    return losses, metrics


def kd(model, batch, ctx, chunk=None):
    """Mean over an example's response positions of −Σ_v p_teacher(v) log p_student(v): the forward KL to the teacher
    up to the teacher's entropy. chunk: rows of logits at a time (Head.cross_entropy; default from the vocab)."""
    body, head = body_and_head(model)
    hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1]
    mask = batch['response_mask'][:, 1:]
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # only response positions are distilled
    with torch.no_grad():
        teacher_body, teacher_head = body_and_head(ctx.teacher)
        teacher_hidden = teacher_body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
        teacher_hidden = teacher_hidden.last_hidden_state[:, :-1].reshape(-1, teacher_hidden.last_hidden_state.shape[-1])
    losses = head.cross_entropy(hidden.reshape(-1, hidden.shape[-1])[rows], teacher_head, teacher_hidden[rows], chunk)
    per_token = torch.zeros(mask.numel(), device=hidden.device, dtype=torch.float32).index_put((rows,), losses)
    tokens = mask.sum(1).clamp(min=1)
    return per_token.view(mask.shape).sum(1) / tokens, {'tokens': tokens.float()}


def rl(model, batch, ctx):
    """Reinforcement learning on a batch of prompts: G sampled completions each, rewarded, the clipped surrogate with
    a KL to the reference (rl.py, which is long enough for a module of its own). Under no_grad: greedy, −reward."""
    return reinforcement_learning.objective(model, batch, ctx)


def rm(model, batch, ctx):
    """The reward model: a scalar head on the policy's body, TRL's pairwise loss on preference pairs (reward_model.py)."""
    return reward_model.objective(model, batch, ctx)


OBJECTIVES = {'sft': sft, 'dpo': dpo, 'kd': kd, 'rl': rl, 'rm': rm}
DATA_KIND = {'sft': 'sft', 'dpo': 'pref', 'kd': 'sft', 'rl': 'prompt', 'rm': 'pref'}  # which kind of split each objective reads
