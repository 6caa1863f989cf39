"""What acts and what judges: environments, ReAct agents with rubrics, peer panels, credit critics.

``agents.base`` is the shared vocabulary (Task, Trajectory, Environment, Policy, Judge)."""
