"""Running from a flash store: compressed weights, the residency planner, streaming."""
