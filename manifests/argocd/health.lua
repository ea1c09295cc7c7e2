-- Argo CD health check for finetune.dev/FineTuneJob (Lua 5.1, as Argo CD runs it).
-- Pending, Training, Exporting and no status yet -> Progressing; Succeeded -> Healthy;
-- Failed -> Degraded; Suspended -> Suspended. A status older than the spec (observedGeneration
-- below metadata.generation) is Progressing until the operator has seen the change.
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator to pick up the job"

if obj.status == nil or obj.status.phase == nil then
  return hs
end

local status = obj.status
local phase = status.phase
local message = status.message
if type(message) ~= "string" or message == "" then
  message = phase
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
elseif phase == "Training" then
  hs.status = "Progressing"
  local progress = status.progress
  if progress ~= nil and progress.percent ~= nil then
    hs.message = string.format("Training: %.1f%%", progress.percent)
    if progress.step ~= nil and progress.totalSteps ~= nil then
      hs.message = hs.message .. string.format(" (step %d/%d)", progress.step, progress.totalSteps)
    end
    if status.restarts ~= nil and status.restarts > 0 then
      hs.message = hs.message .. ", restarts: " .. tostring(status.restarts)
    end
  else
    hs.message = message
  end
elseif phase == "Pending" or phase == "Exporting" then
  hs.status = "Progressing"
  hs.message = message
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
