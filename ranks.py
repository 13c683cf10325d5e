"""
The process group. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is a world of one (the only
branch). Every rank runs the same loop and must take the same branches, so the numbers that steer it (held-out
losses, a non-finite check, the logged means) are summed over ranks first.
"""
import os

import torch
import torch.distributed as dist


def join(device, deepspeed):
    """Pin this process's GPU, then join the process group: DeepSpeed's init_distributed (which wants a group even for
    one process: a world of one on a free local port) or torch's under torchrun. Returns rank, local_rank,
    world_size, device (cuda:<local rank> on GPUs)."""
    ddp = 'RANK' in os.environ
    if deepspeed and not ddp:
        os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=os.environ.get('MASTER_PORT', str(29500 + os.getpid() % 1000)))
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('LOCAL_RANK', 0), ('WORLD_SIZE', 1)))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    if deepspeed:
        import deepspeed as ds
        ds.init_distributed(dist_backend=backend)
    elif ddp:
        dist.init_process_group(backend=backend)
    return rank, local_rank, world_size, device


def distributed():
    """True when there are other ranks to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values, device):
    """Sum a list of floats over ranks (every rank gets the same numbers), in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


def leave():
    """Wait for every rank, then leave the process group (a world of one has nothing to leave)."""
    if distributed():
        dist.barrier()
        dist.destroy_process_group()
