"""Input moments summed over calibration batches, shared by the modules that
read the same input."""

import weakref

import torch


class _MomentSum:
    """The sum of ``x x^T`` over input rows, shared by the modules that read them.

    Several layers often read the same input tensor (a block's queries, keys
    and values; a gated MLP's gate and up projections): they share one sum,
    float32, each batch's rows added once, in place (no moment of a batch is
    kept). A module that reads another tensor in a later batch than its
    partners takes a sum of its own (:meth:`add`).
    """

    def __init__(self, n_in):
        self.sum = torch.zeros(n_in, n_in, dtype=torch.float32)
        self._array = None
        self.n_rows = 0
        self.since = None  # the first batch added
        # the last batch added: how to read its rows again (a weak reference
        # to the input and its reader), and their number
        self.batch, self.last = -1, None

    def add(self, rows, batch, source):
        """Add one batch's rows; the sum that holds them (a new one, split off
        from this, if this one already took other rows in this batch).

        ``source``: the input tensor the rows come from, and its reader.
        """
        target = self
        if self.batch == batch:  # partners read another tensor: part ways
            (ref, reader), n = self.last
            earlier = ref()
            if earlier is None:
                raise RuntimeError(
                    "calibrate: modules that read one input in a batch read "
                    "different inputs in a later one, the earlier input gone; "
                    "calibrate them in separate calls"
                )
            target = _MomentSum.__new__(_MomentSum)
            target.sum = self.sum - _moment(reader.rows(earlier))
            target._array = None
            target.n_rows = self.n_rows - n
            target.since = self.since if target.n_rows else None
        if target.since is None:
            target.since = batch
        if rows.device.type == "cpu" and rows.dtype == torch.float32:
            target.sum.addmm_(rows.T, rows)
        else:
            target.sum += _moment(rows)
        target.n_rows += rows.shape[0]
        tensor, reader = source
        target.batch, target.last = batch, ((weakref.ref(tensor), reader), len(rows))
        return target

    def array(self):
        """The sum as a float32 array (one for all its readers)."""
        if self._array is None:
            self._array = self.sum.numpy()
        return self._array


def _moment(rows):
    """``rows^T rows`` in float32, on the CPU."""
    return (rows.T @ rows).to("cpu", torch.float32)
