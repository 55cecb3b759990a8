"""Search algorithms over head scores: CTC prefix scoring, beam searches."""
