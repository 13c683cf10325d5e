"""
Checkpoints that a kill at any moment cannot corrupt, and resumes that continue the run exactly as if it had never
stopped: which config a resumed run has, how a checkpoint is staged, committed and published (save_checkpoint), the
HF export, and how a resumed run reads it all back (read_checkpoint, resume). bipost.py calls these with `run`, a
namespace of what they touch (out_dir, master, the engine/optimizer/raw_model, the selectors and data cursors, ...);
a checkpoint that out_dir no longer matches raises ValueError with a one-line message, which bipost.py prints.
"""
import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist

from configurator import configure, ConfigError

# Resuming continues the run in out_dir as if it had never stopped: the checkpoint's saved config is the starting
# point and the command line (files, --key=value) is applied over it. Only these keys may then differ from the saved
# values: they steer how far the run goes, what it evaluates, logs and saves, and where it runs. Every other key
# (dataset, splits, objectives, strategy, weights, beta, losses, data selection, model, batch sizes, seed, dtype,
# deepspeed, the lr schedule, ... and any key added later until it is listed here) would make the resumed run differ
# from an uninterrupted one and is refused. max_iters may change: what depends on the run's length (the cosine lr
# decay, sequential's shares) then follows the new max_iters from the resume point on; updates already taken stay.
RESUME_MAY_CHANGE = ['max_iters', 'eval_interval', 'eval_iters', 'log_interval', 'eval_only', 'always_save_checkpoint',
                     'export_hf', 'wandb_log', 'wandb_project', 'wandb_run_name', 'nonfinite', 'out_dir', 'init_from',
                     'overwrite', 'device', 'gradient_checkpointing',  # the same gradients, other memory
                     'save_checkpoints', 'peak_flops', 'sft_grads_in_forward', 'packing']  # (packing: the same numbers)


def resume_config(out_dir, defaults, argv):
    """The config of a resumed run: the checkpoint's, with argv applied over it; a change of a fixed key is refused."""
    pointer = os.path.join(out_dir, 'ckpt.json')
    if not os.path.exists(pointer):
        raise ConfigError(f"init_from='resume' but {pointer} does not exist: no complete checkpoint in out_dir={out_dir}; "
                          f"start the run without --init_from=resume")
    with open(pointer) as f:
        saved = json.load(f).get('config')
    if saved is None:
        raise ConfigError(f"{pointer} holds no saved config (an older bipost wrote it): resume it with that version")
    resumed = {**defaults, **{k: v for k, v in saved.items() if k in defaults and k not in ('out_dir', 'device')}}
    configure(resumed, argv, verbose=False)  # out_dir and device are this launch's: the run may have moved
    for key, value in resumed.items():
        if key not in RESUME_MAY_CHANGE and value != saved.get(key, defaults[key]):
            raise ConfigError(f"{key}={value!r} but the checkpoint in {out_dir} was trained with {key}="
                              f"{saved.get(key, defaults[key])!r}: a resumed run keeps its config; drop {key} from the "
                              f"command line and config file, or start a new run in another out_dir")
    return resumed


def write_json_atomic(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


# A checkpoint of update N is saved in three steps (save_checkpoint, below), so that a kill at any moment leaves either
# checkpoint N-1 or N, never a mix:
#   1. stage: its files, complete, into out_dir/stage-N/ (ckpt.pt or, under DeepSpeed, the shards in out_dir/ds/<tag>,
#      hf/, the data selector's weights/ranking/keep.npy). A kill here leaves N-1 as it was; the stage is dropped later.
#   2. commit: ckpt.json, written as ckpt.json.tmp and renamed over the old one, points at N and names the stage.
#      This rename is the one moment the checkpoint changes.
#   3. publish: each staged file is renamed to its place in out_dir, then the stage (and, under DeepSpeed, the shards
#      of other tags) is removed. A kill here leaves a committed stage partly published; the next start finishes it
#      (publish is idempotent) before anything reads the checkpoint.

def publish(out_dir, pointer):
    """Step 3 (also on startup, to finish one a kill interrupted); drops stages that were never committed."""
    stage = pointer.get('stage')
    if stage and os.path.isdir(os.path.join(out_dir, stage)):
        for name in sorted(os.listdir(os.path.join(out_dir, stage))):
            source, target = os.path.join(out_dir, stage, name), os.path.join(out_dir, name)
            if os.path.isdir(source):  # hf/: a directory cannot be renamed over another; move the old one aside
                shutil.rmtree(target + '.old', ignore_errors=True)
                if os.path.exists(target):
                    os.replace(target, target + '.old')
                os.replace(source, target)
                shutil.rmtree(target + '.old', ignore_errors=True)
            else:
                os.replace(source, target)
    for name in os.listdir(out_dir):  # stages never committed; an old hf/ a kill left aside
        if name.startswith('stage-') or name.endswith('.old'):
            shutil.rmtree(os.path.join(out_dir, name))
    for tag in os.listdir(os.path.join(out_dir, 'ds')) if 'tag' in pointer else []:  # DeepSpeed: older checkpoints
        if tag.startswith('iter_') and tag != pointer['tag']:  # (ds/ also holds DeepSpeed's zero_to_fp32.py)
            shutil.rmtree(os.path.join(out_dir, 'ds', tag))


def finish_publish(out_dir):
    """On startup (rank 0, before anything reads the checkpoint): step 3 of a save that a kill interrupted."""
    if os.path.exists(os.path.join(out_dir, 'ckpt.json')):
        with open(os.path.join(out_dir, 'ckpt.json')) as f:
            publish(out_dir, json.load(f))


def read_checkpoint(out_dir, resuming, master, world_size):
    """On startup: rank 0 finishes a save that a kill interrupted, every rank waiting for it; then a resumed run's
    pointer (ckpt.json) and, for plain torch, the ckpt.pt it points at (else None); a fresh run's (None, None). A
    resume on another number of ranks is refused: each rank's data cursor and sampling seed, the split of every batch
    over the ranks and DeepSpeed's optimizer shards are the world size's, so that it could not continue exactly."""
    if master:
        finish_publish(out_dir)
    if world_size > 1:
        dist.barrier()  # every rank reads the published files
    if not resuming:
        return None, None
    with open(os.path.join(out_dir, 'ckpt.json')) as f:
        checkpoint = json.load(f)
    saved = checkpoint.get('world_size', world_size)  # older checkpoints did not record it
    if saved != world_size:
        raise ValueError(f"{os.path.join(out_dir, 'ckpt.json')} was saved by a run on {saved} rank{'s' * (saved > 1)} "
                         f"but this one has {world_size}: a resume continues exactly only on as many ranks (each rank's "
                         f"data cursor and sampling seed, DeepSpeed's optimizer shards); launch it with "
                         f"--nproc_per_node={saved}, or start a new run from its weights (--init_from="
                         f"{os.path.join(out_dir, 'hf')})")
    payload = os.path.join(out_dir, 'ckpt.pt' if checkpoint['format'] == 'torch' else os.path.join('ds', checkpoint['tag']))
    if not os.path.exists(payload):
        raise ValueError(f"{os.path.join(out_dir, 'ckpt.json')} points at {payload}, which does not exist: out_dir was "
                         f"changed outside bipost; restore it, or start over with --overwrite=True")
    if checkpoint['format'] != 'torch':
        return checkpoint, None  # DeepSpeed's engine loads its shards once it exists (resume)
    state = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)
    if state['iter_num'] != checkpoint['iter_num']:
        raise ValueError(f"{os.path.join(out_dir, 'ckpt.pt')} holds update {state['iter_num']} but ckpt.json points at "
                         f"update {checkpoint['iter_num']}: out_dir was changed outside bipost; restore it, or start over "
                         f"with --overwrite=True")
    return checkpoint, state

def resumed_policy(checkpoint, state):
    """The policy of a full-weights resume, built from the config it saved: plain torch's weights from ckpt.pt (state;
    the heads of rl's PPO and of rm are loaded by their owners), DeepSpeed's by its engine once it exists."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint['model_config']))
    if state is not None:
        model.load_state_dict({k: v for k, v in state['model'].items() if not k.startswith(('value_head.', 'reward_head.'))})
    return model

# -----------------------------------------------------------------------------
# a run's state besides weights and optimizer: enough that a resumed run continues exactly (data cursors, selector
# and RNG state)

def train_state(run, iter_num, skipped):
    return {'iter_num': iter_num, 'skipped': skipped, 'selector': run.selector.state_dict(),
            'data_selector': run.data_selector.state_dict() if run.data_selector else None,
            'data': {n: s.state_dict() for n, s in run.train_data.items()}, 'torch_rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state() if run.device.startswith('cuda') else None, 'config': run.config,
            'rl_reward_stats': run.rl_reward_stats}  # rl_reward_norm's running moments (rl.py), else None


def load_train_state(run, state):
    """Restores what train_state saved; returns (iter_num, skipped)."""
    run.selector.load_state_dict(state['selector'])
    if run.data_selector:
        run.data_selector.load_state_dict(state['data_selector'])
    for n, s in run.train_data.items():
        s.load_state_dict(state['data'][n])
    if run.rl_reward_stats is not None:
        run.rl_reward_stats.copy_(state['rl_reward_stats'])
    torch.set_rng_state(state['torch_rng'])
    if state['cuda_rng'] is not None and run.device.startswith('cuda'):
        torch.cuda.set_rng_state(state['cuda_rng'])
    return state['iter_num'], state['skipped']


def resume(run, checkpoint, state):
    """The optimizer (and under DeepSpeed the weights) and the train state of the checkpoint; returns (iter_num, skipped).
    state: read_checkpoint's ckpt.pt (plain torch; its weights are already in the model)."""
    if checkpoint['format'] == 'torch':
        run.optimizer.load_state_dict(state['optimizer'])
    else:
        _, state = run.engine.load_checkpoint(os.path.join(run.out_dir, 'ds'), tag=checkpoint['tag'],
                                              load_module_strict=not run.lora)
    return load_train_state(run, state)


def restart_metrics(path, checkpoint, iter_num):
    """metrics.jsonl holds one record per update and eval (rl_samples.jsonl: per eval), as if the run had never stopped:
    a fresh run starts the log over; a resume drops what the killed run logged after its checkpoint (updates <= N
    stay; the eval at N runs again)."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    kept = [r for r in records if checkpoint and (r['iter'] <= iter_num if 'objective' in r else r['iter'] < iter_num)]
    text = '\n'.join(json.dumps(r) for r in kept) + ('\n' if kept else '')
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)

# -----------------------------------------------------------------------------
# saving: stage, commit, publish (the three steps above)

def save_checkpoint(run, iter_num, skipped):
    """Stage, commit, publish: a kill at any moment leaves a complete checkpoint."""
    from model import adapter_state
    stage = os.path.join(run.out_dir, f'stage-{iter_num:07d}')
    if run.master:
        shutil.rmtree(stage, ignore_errors=True)  # an uncommitted stage of an earlier, killed run
        os.makedirs(stage)
    pointer = {'iter_num': iter_num, 'policy_init': run.policy_source, 'model_config': run.raw_model.config.to_dict(),
               'config': run.config, 'stage': os.path.basename(stage), 'world_size': run.world_size}
    if run.deepspeed:  # each rank writes its shards into a fresh tag dir; the pointer names it only once all are done
        pointer.update(format='deepspeed', tag=f'iter_{iter_num:07d}')
        run.engine.save_checkpoint(os.path.join(run.out_dir, 'ds'), tag=pointer['tag'],
                                   client_state=train_state(run, iter_num, skipped), save_latest=False,
                                   exclude_frozen_parameters=run.lora)
    elif run.master:
        pointer.update(format='torch')
        torch.save({'model': adapter_state(run.raw_model) if run.lora else run.raw_model.state_dict(),
                    'optimizer': run.optimizer.state_dict(), 'model_config': run.raw_model.config.to_dict(),
                    **train_state(run, iter_num, skipped)}, os.path.join(stage, 'ckpt.pt'))
    if run.export_hf and run.config['objectives'] != ['rm']:
        export(run, os.path.join(stage, 'hf'))
    if run.export_hf and 'rm' in run.config['objectives']:  # the reward model: hf/ alone, hf_rm/ beside an LM
        from reward_model import export as export_reward_model
        export_reward_model(run, os.path.join(stage, 'hf' if run.config['objectives'] == ['rm'] else 'hf_rm'))
    if run.data_selector and run.master:
        run.data_selector.save(stage, run.keep_fraction)
    if run.deepspeed:
        dist.barrier()
    if run.master:
        write_json_atomic(os.path.join(run.out_dir, 'ckpt.json'), pointer)  # the commit
        publish(run.out_dir, pointer)


def export(run, path):
    """HF-format weights that AutoModelForCausalLM.from_pretrained loads (LoRA: merged, and the adapters alone in
    hf/adapter, loadable with peft); ZeRO-3 gathers them first."""
    from model import export_state, own_use_cache
    raw_model = run.raw_model
    if run.zero3:  # copied to the CPU while gathered
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(list(raw_model.parameters()), modifier_rank=None)
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        state, adapter = export_state(raw_model, copy=run.zero3) if run.master else (None, None)
    if run.master:
        state = {k: v for k, v in state.items() if not k.startswith(('value_head.', 'reward_head.'))}  # rl's, rm's heads
        base = raw_model.get_base_model() if run.lora else raw_model
        training_use_cache, base.config.use_cache = base.config.use_cache, own_use_cache(run.policy_source)
        try:  # config.json says what the model came with, not the training setting
            base.save_pretrained(path, state_dict=state)
        finally:
            base.config.use_cache = training_use_cache
        if adapter:
            raw_model.save_pretrained(os.path.join(path, 'adapter'), state_dict=adapter)
        if os.path.isdir(run.policy_source):  # ship the tokenizer with the weights
            from transformers import AutoTokenizer
            try:
                AutoTokenizer.from_pretrained(run.policy_source).save_pretrained(path)
            except (OSError, ValueError):
                pass  # a weights-only directory: the export has no tokenizer either
        shutil.copy(run.meta_path, os.path.join(path, 'bipost_data_meta.json'))
