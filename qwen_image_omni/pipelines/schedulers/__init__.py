"""Schedulers for the RL pipelines: diffusers' flow-match Euler scheduler with SDE steps and log-probs."""

from .flow_match_sde import FlowMatchSDEDiscreteScheduler, FlowMatchSDEDiscreteSchedulerOutput

__all__ = ["FlowMatchSDEDiscreteScheduler", "FlowMatchSDEDiscreteSchedulerOutput"]
