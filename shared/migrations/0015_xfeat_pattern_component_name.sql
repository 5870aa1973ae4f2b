-- XFeat's pattern component was `coat:pattern` until RootSIFT's joined it as `coat:pattern-rootsift`; it is
-- `coat:pattern-xfeat` now. The names are keys of what later decisions read: each graph edge's raw scores
-- (the census re-scores edges with the property's calibration) and each stored calibration's fitted
-- components and weights. Results already recorded keep the name they were decided under.
UPDATE identity_edges
   SET components = (components - 'coat:pattern') || jsonb_build_object('coat:pattern-xfeat', components -> 'coat:pattern')
 WHERE components ? 'coat:pattern';

UPDATE calibrations
   SET artifact = jsonb_set(artifact, '{fusion,calibrations}',
                            (artifact #> '{fusion,calibrations}') - 'coat:pattern'
                            || jsonb_build_object('coat:pattern-xfeat', artifact #> '{fusion,calibrations,coat:pattern}'))
 WHERE jsonb_typeof(artifact #> '{fusion,calibrations}') = 'object' AND (artifact #> '{fusion,calibrations}') ? 'coat:pattern';

UPDATE calibrations
   SET artifact = jsonb_set(artifact, '{fusion,weights}',
                            (artifact #> '{fusion,weights}') - 'coat:pattern'
                            || jsonb_build_object('coat:pattern-xfeat', artifact #> '{fusion,weights,coat:pattern}'))
 WHERE jsonb_typeof(artifact #> '{fusion,weights}') = 'object' AND (artifact #> '{fusion,weights}') ? 'coat:pattern';
