# The README's commands, and container images.
#   make up | down | logs            the stack with docker compose
#   make up-cluster | down-cluster   the same on a three-node RabbitMQ cluster (docs/cluster.md)
#   make cluster-cookie              a random RABBITMQ_ERLANG_COOKIE in .env if none (up-cluster)
#   make run-local                   the same processes on this machine, without Docker
#   make test                        the whole test suite
#   make deadletters ARGS="list"     the dead-letter tool (list | replay | purge; --help)
#   make buildx-builder                                once: a builder for multi-platform images
#   make docker-build SERVICE=worker VERSION=1.2.0     one service, linux/amd64 + linux/arm64
#   make docker-build-all VERSION=1.2.0                every service
#   make docker-push SERVICE=worker VERSION=1.2.0      build and push one service
#   make docker-push-all VERSION=1.2.0                 build and push every service
# Images are tagged $(REGISTRY)/<service>:$(VERSION); set REGISTRY to your registry's prefix.

SERVICES := user_service campaign_service worker gateway migrate
REGISTRY ?= campaign-platform
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PLATFORMS ?= linux/amd64,linux/arm64
BUILDX ?= docker buildx

port_user_service := 8000
port_campaign_service := 8001
port_gateway := 8080
port_worker := 9000
port_migrate := 8000

.PHONY: up down logs run-local test check deadletters jwt-key docker-build docker-build-all docker-push \
	docker-push-all benchmark buildx-builder _require-service up-cluster down-cluster \
	cluster-cookie

up:
	docker compose up --build --detach

down:
	docker compose down

logs:
	docker compose logs --follow

CLUSTER_COMPOSE := docker compose -f docker-compose.yml -f docker-compose.cluster.yml

up-cluster: cluster-cookie
	$(CLUSTER_COMPOSE) up --build --detach

# The Erlang cookie the cluster's nodes share (docker-compose.cluster.yml requires one): when
# neither the environment nor .env sets one, a random one is written into .env (created if
# missing, owner-only), replacing an empty RABBITMQ_ERLANG_COOKIE= line. One already set stays.
cluster-cookie:
	@if [ -z "$${RABBITMQ_ERLANG_COOKIE:-}" ] && ! grep -Eqs '^RABBITMQ_ERLANG_COOKIE=.' .env; then \
	  cookie=$$(python3 -c 'import secrets; print(secrets.token_hex(32))') \
	  && umask 077 \
	  && { if [ -f .env ]; then grep -v '^RABBITMQ_ERLANG_COOKIE=' .env || true; fi; \
	       echo "RABBITMQ_ERLANG_COOKIE=$$cookie"; } > .env.cookie-tmp \
	  && mv .env.cookie-tmp .env \
	  && echo "wrote a random RABBITMQ_ERLANG_COOKIE into .env"; \
	fi

down-cluster:
	$(CLUSTER_COMPOSE) down

run-local:
	./scripts/run-local

test:
	./scripts/test

benchmark:
	./scripts/benchmark

# Against the broker and database of RABBITMQ_URL and DATABASE_URL (or .env).
deadletters:
	.venv/bin/python -m deadletters $(ARGS)

check:
	bash .ci/run

# A new Ed25519 signing key in PEM, for JWT_PRIVATE_KEY in .env.
jwt-key:
	@python3 -c 'from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as K; from cryptography.hazmat.primitives import serialization as s; print(K.generate().private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()).decode(), end="")' 2>/dev/null \
	  || .venv/bin/python -c 'from joserfc.jwk import OKPKey; print(OKPKey.generate_key("Ed25519").as_pem(private=True).decode(), end="")'

_require-service:
	@case " $(SERVICES) " in *" $(SERVICE) "*) ;; \
	  *) echo "SERVICE must be one of: $(SERVICES)" >&2; exit 2 ;; esac

# Multi-platform builds need a builder with the docker-container driver (once per machine).
buildx-builder:
	$(BUILDX) inspect campaign-platform >/dev/null 2>&1 \
	  || $(BUILDX) create --name campaign-platform --driver docker-container --use

# Multi-platform images stay in the builder's cache unless pushed (docker-push does).
docker-build: _require-service
	$(BUILDX) build --platform $(PLATFORMS) \
	  --build-arg SERVICE=$(SERVICE) --build-arg PORT=$(port_$(SERVICE)) \
	  --tag $(REGISTRY)/$(SERVICE):$(VERSION) $(BUILD_FLAGS) .

docker-build-all:
	@for service in $(SERVICES); do \
	  $(MAKE) --no-print-directory docker-build SERVICE=$$service VERSION=$(VERSION) || exit 1; \
	done

docker-push: BUILD_FLAGS = --push
docker-push: docker-build

docker-push-all:
	@for service in $(SERVICES); do \
	  $(MAKE) --no-print-directory docker-push SERVICE=$$service VERSION=$(VERSION) || exit 1; \
	done
