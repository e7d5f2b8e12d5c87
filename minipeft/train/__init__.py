"""The training side: data, batches, the loop's pieces, resumable run state, reporting."""
