"""
The reward model, objective 'rm': a scalar head on the policy's own body, trained on preference pairs as TRL's
RewardTrainer trains one, and exported as the transformers AutoModelForSequenceClassification that TRL, plain
transformers and rewards.py (rl_reward=<dir>) load.

The score of a row is reward_head(h), h the final hidden state at the row's last token whose id is not the pad id:
the rule of transformers' *ForSequenceClassification (which TRL's reward models are), so the exported classifier
scores exactly what was trained, whether a row is padded on the right (bipost's batches) or on the left. Under causal
attention that token is the only one whose state has read the whole prompt + response. When the pad id is the EOS
(the demo, and TRL's fallback for a tokenizer without a pad token), the response's closing EOS counts as padding
and the score sits on the response's last token: the same token a reward model sees at RL time, where the decoded
completion carries no EOS.

Per pair (TRL 1.16): loss = −log σ(r_chosen − r_rejected − margin) + center·(r_chosen + r_rejected)², margin the
record's "margin" (data/prepare.py keeps TRL's column; 0 without it), center = rm_center_coefficient. Metrics under
TRL's names: accuracy (r_chosen > r_rejected), margin (r_chosen − r_rejected), mean_reward, min_reward and
max_reward (the micro-batch's extremes, which TRL also logs per batch and then averages), and DPOTrainer's
rewards/chosen and rewards/rejected.
"""
import contextlib
import copy
import json
import os
import shutil

import torch
import torch.nn.functional as F

from lm_head import body_and_head
import packing


def last_tokens(input_ids, pad_id):
    """[rows] index of each row's last token whose id is not pad_id (0 for a row of pads), as transformers' sequence
    classifiers find it: the rightmost such token, so left and right padding both work."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def scores(model, batch, pad_id, packed=False):
    """[rows] fp32 reward of each row of batch: the reward head on the final hidden state of its last token.
    packed: the body runs on packed rows (packing.py) and the head reads that same token there."""
    body, _ = body_and_head(model)
    last = last_tokens(batch['input_ids'], pad_id)
    if packed:
        rows = packing.pack(batch['input_ids'], batch['attention_mask'], packing.one_row(body))
        hidden = packing.forward(body, rows)[packing.token_at(rows, last)]
    else:
        hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.reward_head(hidden).squeeze(-1).float()


def pairwise_losses(chosen, rejected, margin=None, center=0.0):
    """(per-pair losses, per-pair metrics) from the pairs' rewards [B]: the mean of the losses is TRL's loss."""
    difference = chosen - rejected
    losses = -F.logsigmoid(difference if margin is None else difference - margin)
    if center:
        losses = losses + center * (chosen + rejected) ** 2  # pulls the rewards towards mean 0 (Eisenstein et al.)
    chosen, rejected = chosen.detach(), rejected.detach()
    both = torch.cat([chosen, rejected])
    return losses, {'accuracy': (chosen > rejected).float(), 'margin': chosen - rejected,
                    'mean_reward': (chosen + rejected) / 2, 'min_reward': both.min().expand_as(chosen),
                    'max_reward': both.max().expand_as(chosen), 'rewards/chosen': chosen, 'rewards/rejected': rejected}


def objective(model, batch, ctx):
    """objectives.OBJECTIVES['rm'] on a preference batch (2B rows, chosen first)."""
    rewards = scores(model, batch, ctx.pad_id, getattr(ctx, 'packing', False))
    B = rewards.shape[0] // 2
    return pairwise_losses(rewards[:B], rewards[B:], batch.get('margin'), ctx.rm_center_coefficient)


def attach(model, state, export_hf):
    """The policy gets its reward head, model.reward_head = Linear(hidden, 1, no bias: the exported classifier's score
    layer), zero at first (the same on every rank without a broadcast), or a plain-torch checkpoint's (state; under
    DeepSpeed the engine loads it). A submodule, so that the optimizer, ZeRO and the checkpoints take it along; with
    LoRA it is set on the peft model after the adapters, and trains beside them. export_hf: the model's family must
    have a sequence classifier to export to; checked now, not after training."""
    base = model.get_base_model() if hasattr(model, 'get_base_model') else model
    if export_hf:
        classifier_for(base.config, base)
    head = torch.nn.Linear(base.config.get_text_config().hidden_size, 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    if state is not None:
        head.weight.data.copy_(state['model']['reward_head.weight'])
    model.reward_head = head


def classifier_for(config, causal_lm, pad_id=None):
    """The empty (meta-device) AutoModelForSequenceClassification of the policy's family, num_labels 1: its body must
    be the causal LM's (the same base_model_prefix) and its head a bias-free Linear named `score` (what the reward
    head becomes). Raises ValueError otherwise."""
    from transformers import AutoModelForSequenceClassification
    config = copy.deepcopy(config)
    config.num_labels = 1
    if pad_id is not None:
        config.get_text_config().pad_token_id = pad_id
    try:
        with torch.device('meta'):
            classifier = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"objective 'rm': model_type '{config.model_type}' has no AutoModelForSequenceClassification in "
                         f"transformers ({str(e).splitlines()[0][:120]}), so its reward model cannot be exported; "
                         f"set export_hf=False, or use another model") from None
    score = getattr(classifier, 'score', None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None or \
            classifier.base_model_prefix != causal_lm.base_model_prefix:
        raise ValueError(f"objective 'rm': {type(classifier).__name__} is not a body plus a bias-free `score` layer as "
                         f"bipost's reward head exports to; set export_hf=False, or use another model")
    return classifier


def export(run, path):
    """path: the reward model as an AutoModelForSequenceClassification (num_labels 1, config.pad_token_id the data's
    pad id) with the data's tokenizer (pad token set) when it has a transformers form: the policy's body (LoRA merged)
    and score = the reward head. ZeRO-3 gathers the weights first. out_dir/hf when 'rm' is the run's only objective,
    out_dir/hf_rm beside a generative one (whose language model is out_dir/hf)."""
    from model import export_state
    raw_model = run.raw_model
    gathered = contextlib.nullcontext()
    if run.zero3:  # copied to the CPU while gathered
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(list(raw_model.parameters()), modifier_rank=None)
    with gathered:
        if run.master:
            state, _ = export_state(raw_model, copy=run.zero3)
            head = raw_model.reward_head.weight.detach().to('cpu', torch.float32, copy=True)
    if not run.master:
        return
    with open(run.meta_path) as f:
        meta = json.load(f)
    base = raw_model.get_base_model() if run.lora else raw_model
    classifier = classifier_for(base.config, base, meta['pad_id'])
    prefix = classifier.base_model_prefix + '.'
    body = {k: v for k, v in state.items() if k.startswith(prefix)}  # no LM head, no PPO value head, no reward head
    classifier.save_pretrained(path, state_dict={**body, 'score.weight': head.to(body[next(iter(body))].dtype)})
    tokenizer = data_tokenizer(meta)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    shutil.copy(run.meta_path, os.path.join(path, 'bipost_data_meta.json'))  # as the LM's export: what it was trained on


def data_tokenizer(meta):
    """The tokenizer the data was prepared with, in transformers' form, pad token set as the data's (data/prepare.py:
    the pad token, else the EOS), so that rewards.py reads text as training did: a local tokenizer directory, or the
    demo's byte encoding (byte b -> id b, <|endoftext|> -> 256) rebuilt with the tokenizers library; None for a
    tiktoken encoding, which transformers cannot load."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    name = meta['tokenizer']
    if os.path.isdir(name):
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if name != 'bipost-demo-bytes':
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    # byte-level pre-tokenization shows byte b as a printable character: itself where printable (GPT-2's table),
    # else chr(256 + k) for the k-th unprintable byte; that character is then the token of id b
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    character = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(unprintable)}
    tokens = Tokenizer(models.BPE({character[b]: b for b in range(256)} | {'<|endoftext|>': 256}, []))
    tokens.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokens, eos_token='<|endoftext|>', pad_token='<|endoftext|>')
