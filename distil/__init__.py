"""The DistIL trainer: tasks, experts, rollouts, objectives and the `distil` CLI.

It drives `distil_kernels`; see DESIGN.md, "Trainer".
"""
