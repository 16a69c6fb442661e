"""The route table: the longest matching prefix wins; prefixes match whole path segments."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.settings import RouteConfig


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    upstream: str
    ready_url: str
    hidden_paths: tuple[str, ...]
    _origin: str
    _base_path: str

    @classmethod
    def from_config(cls, config: RouteConfig) -> Route:
        parts = urlsplit(config.upstream)
        origin = f"{parts.scheme}://{parts.netloc}"
        return cls(
            name=config.name,
            prefix=config.prefix.rstrip("/") or "/",
            upstream=config.upstream,
            ready_url=origin + config.ready_path,
            hidden_paths=tuple(path.rstrip("/") for path in config.hidden_paths),
            _origin=origin,
            _base_path=parts.path.rstrip("/"),
        )

    def matches(self, path: str) -> bool:
        if self.prefix == "/":
            return True
        return path == self.prefix or path.startswith(self.prefix + "/")

    def upstream_path(self, path: str) -> str:
        rest = path[len(self.prefix) :] if self.prefix != "/" else path
        return (self._base_path + rest) or "/"

    def hides(self, path: str) -> bool:
        """Whether the upstream path ``path`` maps to is one the edge does not expose."""
        target = self.upstream_path(path)
        return any(
            target == hidden or target.startswith(hidden + "/") for hidden in self.hidden_paths
        )

    def target(self, path: str) -> str:
        """The upstream URL for ``path`` (the query string is added by the caller)."""
        return self._origin + self.upstream_path(path)

    def public_location(self, location: str) -> str:
        """An upstream redirect's ``Location``, as the caller must follow it: through the
        gateway's prefix, never to the upstream's internal address. Another site's URL and a
        path relative to the current one stay as they are."""
        if location == self._origin or location.startswith(
            (self._origin + "/", self._origin + "?")
        ):
            path = location[len(self._origin) :]
            path = path if path.startswith("/") else "/" + path
        elif location.startswith("/") and not location.startswith("//"):
            path = location
        else:
            return location
        base = self._base_path
        if base and not (path == base or path.startswith((base + "/", base + "?"))):
            return path  # outside this route's upstream path: at least not the internal host
        prefix = "" if self.prefix == "/" else self.prefix
        public = prefix + path[len(base) :]
        return public if public.startswith("/") else "/" + public


class RouteTable:
    def __init__(self, configs: list[RouteConfig]) -> None:
        routes = [Route.from_config(config) for config in configs]
        self.routes = sorted(routes, key=lambda route: len(route.prefix), reverse=True)

    def match(self, path: str) -> Route | None:
        return next((route for route in self.routes if route.matches(path)), None)
