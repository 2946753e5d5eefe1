"""Code that judges maps: deletion / insertion, sanity checks, class sensitivity, comparisons."""
