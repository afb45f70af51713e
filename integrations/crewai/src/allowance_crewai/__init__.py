"""allowance for CrewAI (work in progress)."""
