"""System gates, cost model and the planner that spends an adaptation budget."""
