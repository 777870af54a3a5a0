-- One database per service (ARCHITECTURE.md: each service owns its own database).
--
-- The postgres image runs this file once, when its data volume is empty, as
-- POSTGRES_USER (the owner of every database below). Each service's
-- <SERVICE>_DATABASE_URL in docker-compose.yml names one of these databases;
-- the services create their own tables at startup.
--
-- A database added here on a volume that already exists is not created: run
-- `docker compose exec postgres createdb -U aiagg <name>` or drop the volume.

CREATE DATABASE auth;
CREATE DATABASE orchestrator;
CREATE DATABASE proxy;
CREATE DATABASE billing;
CREATE DATABASE analytics;

-- Nobody but the owner may connect to them.
REVOKE ALL ON DATABASE auth FROM PUBLIC;
REVOKE ALL ON DATABASE orchestrator FROM PUBLIC;
REVOKE ALL ON DATABASE proxy FROM PUBLIC;
REVOKE ALL ON DATABASE billing FROM PUBLIC;
REVOKE ALL ON DATABASE analytics FROM PUBLIC;
