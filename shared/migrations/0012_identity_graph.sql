-- The census as an identity graph per property: machine edges between detections, people's answers, the
-- census job's runs and the questions it asks. Individuals are the graph's clustering; the census job
-- (services/census) re-solves it over the season and moves detections as `decided_by = 'recluster'`.
ALTER TABLE detections DROP CONSTRAINT detections_decided_by_check;
ALTER TABLE detections ADD CONSTRAINT detections_decided_by_check
    CHECK (decided_by IN ('fusion', 'human', 'recluster'));

-- One machine edge per scored pair of detections (a < b): each component's raw score, so that a refitted
-- calibration re-weighs every edge without scoring anything again. `probability` is the calibrated
-- P(same individual) when the edge was written (fusion: with the calibration it decided with).
CREATE TABLE identity_edges (
    property    text NOT NULL REFERENCES properties (name),
    a           uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    b           uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    components  jsonb NOT NULL,  -- {component: raw score}
    probability real CHECK (probability BETWEEN 0 AND 1),
    source      text NOT NULL CHECK (source IN ('fusion', 'census')),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (a, b),
    CHECK (a < b)
);
CREATE INDEX identity_edges_property ON identity_edges (property);
CREATE INDEX identity_edges_b ON identity_edges (b);

-- Whether the census service re-clusters the property on its own (after enough decisions, or on a schedule);
-- off, it runs only when asked (`deer-reid census recluster`): a bulk import, or an evaluation that measures
-- the online decisions alone, holds it.
ALTER TABLE properties ADD COLUMN census_auto boolean NOT NULL DEFAULT true;

-- What the census job did, run by run: a run that dies mid-way (kill -9) leaves `running` and nothing
-- else (its changes are one transaction); the next run marks it `abandoned` and does the work.
CREATE TABLE census_runs (
    id             bigserial PRIMARY KEY,
    property       text NOT NULL REFERENCES properties (name),
    state          text NOT NULL DEFAULT 'requested'
                   CHECK (state IN ('requested', 'running', 'done', 'failed', 'abandoned')),
    requested_by   text NOT NULL DEFAULT 'schedule',
    requested_at   timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    decisions_seen bigint NOT NULL DEFAULT 0,  -- the newest decision id the run read (the trigger's counter)
    answers_seen   bigint NOT NULL DEFAULT 0,  -- the newest answer id it read
    summary        jsonb,
    error          text
);
CREATE INDEX census_runs_property ON census_runs (property, id DESC);
CREATE UNIQUE INDEX census_runs_one_pending ON census_runs (property) WHERE state IN ('requested', 'running');

-- The questions a run asks, best first; a newer run replaces the open ones (they turn `stale`).
CREATE TABLE census_questions (
    id         bigserial PRIMARY KEY,
    property   text NOT NULL REFERENCES properties (name),
    run_id     bigint NOT NULL REFERENCES census_runs (id),
    a          uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    b          uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    kind       text NOT NULL CHECK (kind IN ('merge', 'split')),
    rank       int NOT NULL,
    flip       real NOT NULL,  -- the chance the answer changes the census
    moves      int NOT NULL,   -- detections it would move
    priority   real NOT NULL,
    log_odds   real NOT NULL,
    -- what it is about: two individuals (a merge) or one unit and its individual (a split); an answer
    -- settles every open question of its run about the same two sides
    side_a     text NOT NULL,
    side_b     text NOT NULL,
    state      text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'answered', 'skipped', 'stale')),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (a < b)
);
CREATE INDEX census_questions_open ON census_questions (property, rank) WHERE state = 'open';

-- People's answers about pairs: hard rules for the clustering (`same` joins, `different` separates,
-- `cannot-tell` takes the pair out of the questions). Audited; an undone answer stops counting.
CREATE TABLE identity_answers (
    id          bigserial PRIMARY KEY,
    property    text NOT NULL REFERENCES properties (name),
    a           uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    b           uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    answer      text NOT NULL CHECK (answer IN ('same', 'different', 'cannot-tell')),
    actor       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    question_id bigint REFERENCES census_questions (id),
    audit_id    bigint REFERENCES audit_log (id),
    undone      boolean NOT NULL DEFAULT false,
    answered_at timestamptz NOT NULL DEFAULT now(),
    CHECK (a < b)
);
CREATE INDEX identity_answers_property ON identity_answers (property) WHERE NOT undone;
CREATE INDEX identity_answers_pair ON identity_answers (a, b) WHERE NOT undone;

-- A calibration may belong to one property: fitted on its people's answers (the census job), it applies to
-- that property's edges and decisions before the global one.
ALTER TABLE calibrations ADD COLUMN property text REFERENCES properties (name);
CREATE INDEX calibrations_property ON calibrations (property, id DESC) WHERE active;
