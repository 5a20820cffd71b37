"""Teaching: the recorded walkthrough and its figures, the alpha-beta fit, the cost model, DP/TP/PP patterns."""
