"""Pure recommendation policies over a catalog: retrieval, re-rank, exploration, steering."""
