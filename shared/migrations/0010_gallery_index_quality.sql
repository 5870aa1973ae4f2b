-- The gallery indexes again, built with a wider candidate list (ef_construction 128; pgvector's default
-- is 64). A better-connected graph reaches the same recall with a narrower search: at 100,000 1280-d
-- exemplars (`deer-reid bench --gallery`), recall@50 0.989 at ef_search 100 against 0.969 with the
-- default graph, and fusion searches at ef_search 100 instead of 200 (p99 7 ms against 12 ms). The
-- build costs about twice as long, once. m stays at its default of 16.
DROP INDEX embeddings_gallery_768;
CREATE INDEX embeddings_gallery_768 ON embeddings USING hnsw ((vec::halfvec(768)) halfvec_cosine_ops)
    WITH (m = 16, ef_construction = 128) WHERE dim = 768 AND exemplar;
DROP INDEX embeddings_gallery_1280;
CREATE INDEX embeddings_gallery_1280 ON embeddings USING hnsw ((vec::halfvec(1280)) halfvec_cosine_ops)
    WITH (m = 16, ef_construction = 128) WHERE dim = 1280 AND exemplar;
DROP INDEX embeddings_gallery_1536;
CREATE INDEX embeddings_gallery_1536 ON embeddings USING hnsw ((vec::halfvec(1536)) halfvec_cosine_ops)
    WITH (m = 16, ef_construction = 128) WHERE dim = 1536 AND exemplar;
DROP INDEX embeddings_gallery_2048;
CREATE INDEX embeddings_gallery_2048 ON embeddings USING hnsw ((vec::halfvec(2048)) halfvec_cosine_ops)
    WITH (m = 16, ef_construction = 128) WHERE dim = 2048 AND exemplar;
