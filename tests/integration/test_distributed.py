"""NSO, SAM and WSAM under torch.distributed: 2 CPU ranks (gloo) spawned by the test."""
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def spawn(tmp_path, *names, world=2):
    mp.spawn(dist_worker.run, args=(world, str(tmp_path / "init"), names), nprocs=world,
             join=True)


def test_ddp_shared_noise_equals_one_process_with_one_all_reduce_per_step(tmp_path):
    spawn(tmp_path, "ddp_matches_one_process", "reference_nso_all_reduces_every_pass",
          "three_call_ddp_matches_one_process", "per_rank_noise", "m_sharpness")


def test_cheap_schedules_under_ddp_sync_once_per_cheap_step(tmp_path):
    spawn(tmp_path, "cheap_schedules_sync_once")


def test_ddp_gradient_as_bucket_view_gathers_the_averaged_sum(tmp_path):
    spawn(tmp_path, "ddp_bucket_views")


def test_parameters_without_gradients_are_skipped_alike_on_every_rank(tmp_path):
    spawn(tmp_path, "parameters_without_gradients")


def test_fsdp2_shared_noise_equals_ddp(tmp_path):
    spawn(tmp_path, "fsdp2_matches_ddp", "fsdp2_amp_shard_overflow", "fsdp2_mixed_precision")


def test_fsdp2_skips_parameters_without_gradients_as_torch_does(tmp_path):
    spawn(tmp_path, "fsdp2_parameters_without_gradients")


def test_hsdp_sums_norms_over_shards_not_replicas(tmp_path):
    spawn(tmp_path, "hsdp_matches_ddp", world=4)


def test_fsdp2_resumes_bit_identically_through_distributed_checkpoint(tmp_path):
    spawn(tmp_path, "fsdp2_dcp_resume")
