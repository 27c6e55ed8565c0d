"""Admission: a request's images get in only when the server has the memory for them and can finish them in time.

Both checks run before any pixel is decoded, on numbers the server already has:

- **memory**: the pixels of every image admitted and not yet answered, as their headers declare them, stay
  within ``max_pixels``. A request over the whole budget can never fit (:class:`NeverFits`, HTTP 413); one
  that only has to wait for others to finish is refused with :class:`~d2ops.serving.core.Overloaded`
  (HTTP 503 with Retry-After).
- **time**: the images already admitted, plus the request's own, at the measured seconds per image, finish
  within ``headroom`` of the time the request has left. Work that would only wait to time out (504) is
  refused at once with 503 and a Retry-After from the same estimate.

Pixels are charged at the header's full size from admission to the reply: decoding a PNG needs the whole
frame at once, even when it is then reduced for inference. The charge is per worker process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from d2ops.serving.core import Overloaded

__all__ = ["Admission", "NeverFits", "Ticket"]

#: Admit work only when it is estimated to finish within this share of the time left: the estimate is a
#: running average, and a batch already running is not counted.
DEFAULT_HEADROOM = 0.8


class NeverFits(ValueError):
    """The request alone is over the server's pixel budget: no wait makes it fit (HTTP 413)."""


@dataclass(frozen=True)
class Ticket:
    """What one admitted request holds until its reply: give it back with :meth:`Admission.release`."""

    images: int
    pixels: int


class Admission:
    """The server-wide budget of pixels in flight and the deadline estimate, for one event loop (not thread-safe).

    ``seconds_per_image`` is the measured inference time per image (0 until a batch has run: then only the
    pixel budget applies).
    """

    def __init__(
        self, max_pixels: int, seconds_per_image: Callable[[], float], headroom: float = DEFAULT_HEADROOM
    ) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive pixel count, got {max_pixels}")
        if not 0.0 < headroom <= 1.0:
            raise ValueError(f"headroom must be a share of the time left, in (0, 1], got {headroom}")
        self.max_pixels = max_pixels
        self.seconds_per_image = seconds_per_image
        self.headroom = headroom
        self.pixels = 0  # of the requests admitted and not yet released
        self.images = 0

    def seconds_for(self, images: int = 0) -> float:
        """Estimated seconds until the images in flight, and ``images`` more, are done."""
        return (self.images + images) * self.seconds_per_image()

    def retry_after(self) -> int:
        """Whole seconds until the work in flight is likely done (at least 1): the client's Retry-After."""
        return max(1, math.ceil(self.seconds_for()))

    def admit(self, pixels: Sequence[int], seconds_left: float) -> Ticket:
        """Charge a request's images (their header pixel counts), or refuse it.

        Raises :class:`NeverFits` when the request alone is over the budget, and
        :class:`~d2ops.serving.core.Overloaded` when it has to wait for other requests' pixels to be
        released, or when the images ahead of it would not let it finish in ``seconds_left``. A request
        with nothing ahead of it is always let in on time: it cannot finish sooner by waiting.
        """
        total = sum(pixels)
        if total > self.max_pixels:
            raise NeverFits(
                f"the request's images hold {total} pixels; this server decodes at most {self.max_pixels} "
                "at once (--max-pixels-in-flight): send fewer or smaller images per request"
            )
        if self.pixels + total > self.max_pixels:
            raise Overloaded(
                f"server busy: other requests hold {self.pixels} of its {self.max_pixels} pixels in flight "
                f"(--max-pixels-in-flight) and this one needs {total}; retry later",
                retry_after=self.retry_after(),
            )
        needed = self.seconds_for(len(pixels))
        if self.images and needed > self.headroom * seconds_left:
            raise Overloaded(
                f"server overloaded: {self.images} images ahead, about {needed:.1f} s of work with this request, "
                f"more than the {seconds_left:.1f} s it has left (--request-timeout); retry later",
                retry_after=self.retry_after(),
            )
        self.pixels += total
        self.images += len(pixels)
        return Ticket(len(pixels), total)

    def release(self, ticket: Ticket) -> None:
        """The request's reply is ready (or it failed): its pixels and images no longer count."""
        self.pixels -= ticket.pixels
        self.images -= ticket.images
