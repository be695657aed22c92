"""Bookkeeping shared by the mappers that skip unreadable image files.

A mapper returns ``None`` for a file it cannot decode (or, in fine-tuning, a sample whose
annotations or size are unusable), so the loader maps another index instead; the skip
must still be visible. Each process (each DataLoader worker holds its own copy of the
mapper) counts its skips, warns once per file, and hands the count over on its next good
sample as ``"skipped_images"``, so that summing that field over every batch counts each
skip exactly once (:class:`itpn_d2.engine.skipped_images.SkippedImagesMetric` does, and
logs it for every training run).
"""
import logging

__all__ = ["SkippedFileCounter", "printable"]


def printable(text) -> str:
    """``text`` safe for any log stream: a file name that is not valid UTF-8 (Python keeps its
    bytes as lone surrogates) is written with ``\\udcXX`` escapes instead of making the
    logging handler fail with ``UnicodeEncodeError``."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


class SkippedFileCounter:
    """Mixin: ``num_skipped`` (this process's total), ``_skip`` and ``_hand_over_skips``."""

    def _init_skip_counter(self) -> None:
        self.num_skipped = 0  # total skips in this process
        self._pending_skips = 0  # skips not yet reported on a good sample
        self._warned = set()

    def _skip(self, file_name: str, err: Exception, what: str = "unreadable image file") -> None:
        self.num_skipped += 1
        self._pending_skips += 1
        if file_name not in self._warned:  # a file that fails every epoch warns once
            self._warned.add(file_name)
            # the concrete mapper's logger, so the warning says which mapper skipped the file
            logging.getLogger(type(self).__module__).warning(
                printable(
                    f"Skipping {what} '{file_name}' ({type(err).__name__}: {err}); "
                    f"{self.num_skipped} image(s) skipped so far by this process, counted in the "
                    "'skipped_images' metric. Another image is used in its place."
                )
            )

    def _hand_over_skips(self, dataset_dict: dict) -> None:
        dataset_dict["skipped_images"] = self._pending_skips
        self._pending_skips = 0
