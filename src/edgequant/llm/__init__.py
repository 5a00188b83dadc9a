"""Language models on fixed-point hardware: causal LMs in the sim, their evaluation and their techniques."""
