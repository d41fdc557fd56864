"""Services that run on each cluster node beside Ray, started by the cluster's start commands.

``spot``: turns a cloud's interruption notice (AWS spot ``instance-action``, GCP ``preempted``) into a Ray node
drain with the preemption reason and the deadline that remains, which Ray Train V2 reports to the training loop
as ``ray.train.get_preemption_info()``. ``commands``: the ``mmray node`` subcommands.
"""
